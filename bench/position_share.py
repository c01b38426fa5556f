"""Where top examples sit in their contexts: the share of the demo SAEs' top examples that peak at the first
content position (position 1, right after BOS), against that position's share of the counted positions,
with every position after BOS counting (before) and with the warm-up rule (featurescope/positions.py:
a context cut mid-document does not count its first WARMUP_POSITIONS tokens), on three corpora that need
no network: the Python docs (built in), the licence texts in /usr/share/common-licenses and Vim's user
manual (/usr/share/vim/vim*/doc/usr_*.txt), both read as .txt corpora (a blank line ends a document).

    .venv/bin/featurescope demo --no-serve --data-dir data          # trains (or reuses) the demo SAEs once
    .venv/bin/python bench/position_share.py --data-dir data        # --tokens 40000 per corpus, --warmups 0,1,2,4,8

One encoder pass per corpus; every rule's top examples come from the job's own FeatureStats (top_k 20) over
the same activations, so the rules differ only in which positions count. Printed per corpus and rule:
"top@1" the share of top examples at position 1; "top@first" at their context's first counted position
(1, or warm-up + 1 in a mid-document context); "pos@first" the first counted positions' share of all counted
positions, what top@first would be if position did not matter; "lost" the share of content positions the
warm-up leaves out. Rows are pooled over the four SAEs and every feature with a top example; a last line gives
the top examples' share at each of positions 1-8 before, to show how far the excess reaches, and another
top@1 per SAE before and with the rule.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import tempfile
import time
from pathlib import Path

import torch

from featurescope.corpus import content_mask, pack_documents
from featurescope.encoder import FeatureEncoder
from featurescope.models import load_model
from featurescope.positions import WARMUP_POSITIONS, warmup_positions
from featurescope.precompute.corpus_sources import CorpusSpec, iter_texts
from featurescope.precompute.feature_stats import FeatureStats
from featurescope.sae_loading import load_sae
from featurescope.training import DEMO_CONFIG, cached_saes


def text_corpus(name: str, files: list[str], folder: Path) -> CorpusSpec | None:
    """Copy plain-text files into folder/name as .txt (the licences have no suffix), as one corpus."""
    if not files:
        return None
    target = folder / name
    target.mkdir(parents=True)
    for f in sorted(files):
        shutil.copyfile(f, target / (Path(f).name + ".txt"))
    return CorpusSpec(str(target))


def corpora(folder: Path) -> dict[str, CorpusSpec]:
    found = {"python-docs": CorpusSpec(),
             "licences": text_corpus("licences", [f for f in glob.glob("/usr/share/common-licenses/*")
                                                   if Path(f).is_file() and not Path(f).is_symlink()], folder),
             "vim-manual": text_corpus("vim-manual", glob.glob("/usr/share/vim/vim*/doc/usr_*.txt"), folder)}
    return {name: spec for name, spec in found.items() if spec is not None}


PROFILE = 9  # positions 1 to PROFILE - 1 get their own share of the top examples in the printout


def first_counted(mask: torch.Tensor) -> torch.Tensor:
    """Long [n]: each row's first True position (T when none)."""
    T = mask.shape[1]
    pos = torch.where(mask, torch.arange(T)[None, :], T)
    return pos.min(dim=1).values


def measure(lm, saes: dict, spec: CorpusSpec, tokens: int, warmups: list[int], context_len: int, batch_size: int) -> dict:
    ids, starts = pack_documents(lm, iter_texts(spec), context_len, tokens)
    n, T = ids.shape
    stats = {(name, w): FeatureStats(sae.d_sae, T) for name, sae in saes.items() for w in warmups}
    encoder = FeatureEncoder(lm, saes)
    started = time.time()
    for first in range(0, n, batch_size):
        rows = slice(first, min(first + batch_size, n))
        context_ids = torch.arange(rows.start, rows.stop)
        for name, acts, base in encoder.encode_each(ids[rows]):  # base: BOS/EOS/pad and norm outliers left out
            for w in warmups:
                mask = base & ~warmup_positions(starts[rows], T, w)
                stats[name, w].update(acts, context_ids, mask)
    seconds = time.time() - started
    content = content_mask(lm, ids)
    out = {"contexts": n, "doc_starts": float(starts.float().mean()), "seconds": seconds, "rules": {}}
    for w in warmups:
        counted = content & ~warmup_positions(starts, T, w)  # norm outliers aside: the demo SAEs' are rare
        firsts = first_counted(counted)  # [n]
        at1 = at_first = total = 0
        profile = torch.zeros(PROFILE + 1, dtype=torch.long)
        per_sae = {}
        for name in saes:
            final = stats[name, w].finalize()
            ctx, pos = final["top_ctx"], final["top_pos"]  # [F, k]
            found = ctx >= 0
            per_sae[name] = float((found & (pos == 1)).sum() / found.sum().clamp(min=1))
            total += int(found.sum())
            profile += torch.bincount(pos[found].clamp(max=PROFILE).long(), minlength=PROFILE + 1)
            at1 += int((found & (pos == 1)).sum())
            at_first += int((found & (pos == firsts[ctx.clamp(min=0)])).sum())
        out["rules"][w] = {"top@1": at1 / max(total, 1), "top@first": at_first / max(total, 1),
                           "pos@1": float(counted[:, 1].sum() / counted.sum()),
                           "pos@first": float((firsts < T).sum() / counted.sum()),
                           "lost": 1 - float(counted.sum() / content.sum()), "examples": total,
                           "profile": (profile[1:PROFILE] / max(total, 1)).tolist(), "per_sae": per_sae}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="Where `featurescope demo` put the demo SAEs (DATA_DIR/saes).")
    parser.add_argument("--tokens", type=int, default=40_000, help="Corpus tokens per corpus (its first ones).")
    parser.add_argument("--warmups", default="0,1,2,4,8",
                        help="Warm-up lengths to compare; 0 is the rule before (every position after BOS counts).")
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    warmups = sorted({int(w) for w in args.warmups.split(",")} | {0, WARMUP_POSITIONS})

    lm = load_model("smollm2-135m", device="cpu")
    folders = cached_saes(lm, DEMO_CONFIG, Path(args.data_dir) / "saes")
    if folders is None:
        raise SystemExit(f"No demo SAEs in {args.data_dir}/saes: run `featurescope demo --no-serve --data-dir {args.data_dir}` first.")
    saes = {site.short_name: load_sae(str(folder)) for site, folder in folders.items()}
    print(f"SmolLM2-135M, demo SAEs {', '.join(saes)}; {args.tokens} tokens per corpus, contexts of {args.context_len}; "
          f"the rule's warm-up: {WARMUP_POSITIONS} positions ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in corpora(Path(tmp)).items():
            r = measure(lm, saes, spec, args.tokens, warmups, args.context_len, args.batch_size)
            print(f"\n{name}: {r['contexts']} contexts, {r['doc_starts']:.1%} start a document ({r['seconds']:.0f} s)")
            print(f"  {'warm-up':<16} {'top@1':>7} {'pos@1':>7} {'top@first':>10} {'pos@first':>10} {'lost':>6}")
            for w, m in r["rules"].items():
                label = "0 (before)" if w == 0 else f"{w} (the rule)" if w == WARMUP_POSITIONS else str(w)
                print(f"  {label:<16} {m['top@1']:>7.2%} {m['pos@1']:>7.2%} {m['top@first']:>10.2%} "
                      f"{m['pos@first']:>10.2%} {m['lost']:>6.2%}")
            before = r["rules"][0]["profile"]
            print(f"  before, top examples at positions 1-{PROFILE - 1}: {' '.join(f'{p:.2%}' for p in before)} "
                  f"(each position: ~{r['rules'][0]['pos@1']:.2%} of the counted ones)")
            rule = r["rules"][WARMUP_POSITIONS]["per_sae"]
            print("  top@1 per SAE, before -> the rule: " + ", ".join(
                f"{name} {share:.2%} -> {rule[name]:.2%}" for name, share in r["rules"][0]["per_sae"].items()))


if __name__ == "__main__":
    main()
