"""SAE source names, without torch: Gemma Scope's spellings, the site of a local Gemma Scope-layout folder,
and the expansion of what a user passes (`--sae` repeated, `--sae-list FILE`, release patterns) into
concrete sources that `featurescope.sae_loading.load_sae` reads one by one.

    expand_sae_sources(["google/gemma-scope-2b-pt-res/layer_*/width_16k/canonical"])
    # -> ['google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105', ..., '.../layer_25/width_16k/average_l0_...']
    expand_sae_sources(["gemma-scope-2b-pt-res-canonical:layer_*/width_16k/canonical"])     # the same SAEs
    expand_sae_sources(["data/release/gemma-scope-2b-pt-*/layer_*/width_16k/average_l0_*"])  # local folders
    expand_sae_sources([], sae_list="saes.txt")   # one source or pattern a line; '#' comments, blank lines

A pattern has glob characters (`*`, `?`, `[`) in it; its matches come sorted in forward-pass order (layer,
then att, mlp, res; layer_2 before layer_10), and a pattern that matches nothing is an error naming it.
Hub patterns read the repo's file listing (or the local Hugging Face cache when the hub cannot be reached)
and expand to concrete `average_l0_N` names, a `canonical` last segment choosing the variant of each
(layer, width) whose L0 is closest to 100; local patterns glob the filesystem the same way.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from featurescope.errors import FeatureScopeError
from featurescope.flow import flow_key
from featurescope.site_names import Site

CANONICAL_L0 = 100  # Gemma Scope's canonical variant: average L0 closest to this
PARAMS_FILE = "params.npz"

_GEMMA_SCOPE_RELEASE = r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)"
_GEMMA_SCOPE_REPO_RE = re.compile(rf"^google/{_GEMMA_SCOPE_RELEASE}$")
# Gemma Scope's widths are 16k ... 1m; a plain number (width_256) is the same layout at another width.
_GEMMA_SCOPE_ID_RE = re.compile(r"^layer_(\d+)/width_(\d+[km]?)/(average_l0_\d+|canonical)$")
_NEURONPEDIA_RE = re.compile(r"^gemma-2-(2b|9b|27b)(-it)?/(\d+)-gemmascope-(res|mlp|att)-(\d+[km])$")
# A release folder on disk: as `hf download --local-dir` names it, or as the Hugging Face cache does.
_LOCAL_RELEASE_RE = re.compile(rf"^(?:models--google--)?({_GEMMA_SCOPE_RELEASE})$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class SAELoadError(FeatureScopeError, ValueError):
    """An SAE source that cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class GemmaScopePath:
    repo_id: str  # google/gemma-scope-2b-pt-res
    layer: int
    width: str  # "16k" (see width_label)
    variant: str  # "average_l0_71" or "canonical"

    @property
    def site(self) -> Site:
        return Site(self.layer, self.repo_id.rsplit("-", 1)[1])

    @property
    def model_name(self) -> str:
        size, flavour = _GEMMA_SCOPE_REPO_RE.match(self.repo_id).group(1, 2)
        return f"google/gemma-2-{size}" + ("-it" if flavour == "it" else "")

    @property
    def folder(self) -> str:
        return f"layer_{self.layer}/width_{self.width}/{self.variant}"


def parse_gemma_scope(source: str) -> GemmaScopePath | None:
    """The hub path a Gemma Scope source names, in any accepted spelling; None if it is not one."""
    if m := _NEURONPEDIA_RE.match(source):
        size, it, layer, kind, width = m.groups()
        flavour = "it" if it else "pt"
        return GemmaScopePath(f"google/gemma-scope-{size}-{flavour}-{kind}", int(layer), width, "canonical")
    split = _split_gemma_scope(source)
    if split is None:
        return None
    repo_id, sae_id = split
    m = _GEMMA_SCOPE_ID_RE.match(sae_id)
    if not m:
        raise SAELoadError(
            f"Gemma Scope id {sae_id!r} does not parse: expected 'layer_20/width_16k/average_l0_71' or 'layer_20/width_16k/canonical'."
        )
    return GemmaScopePath(repo_id, int(m.group(1)), m.group(2), m.group(3))


def _split_gemma_scope(source: str) -> tuple[str, str] | None:
    """(hub repo id, SAE id) of a hub path or SAELens release:id, the id possibly a pattern; None if neither."""
    if source.startswith("google/gemma-scope-"):
        repo_id, _, sae_id = source.partition("/")[2].partition("/")
        repo_id = "google/" + repo_id
    elif source.startswith("gemma-scope-"):
        release, sae_id = re.split(r"[:/]", source, maxsplit=1) if re.search(r"[:/]", source) else (source, "")
        repo_id = "google/" + release.removesuffix("-canonical")
        if release.endswith("-canonical") and not sae_id.endswith("/canonical"):
            raise SAELoadError(f"Release {release!r} holds canonical ids only, like 'layer_20/width_16k/canonical'; got {sae_id!r}.")
    else:
        return None
    if is_pattern(repo_id):
        raise SAELoadError(f"{source!r}: the release cannot be a pattern; give each repo (e.g. google/gemma-scope-2b-pt-res, "
                           "-mlp, -att) its own --sae pattern.")
    if not _GEMMA_SCOPE_REPO_RE.match(repo_id):
        raise SAELoadError(f"Unknown Gemma Scope repo {repo_id!r}: expected e.g. google/gemma-scope-2b-pt-res (-res, -mlp or -att).")
    return repo_id, sae_id


def gemma_scope_layout(folder: str | Path) -> GemmaScopePath | None:
    """The Gemma Scope SAE a local folder holds by its path, `.../gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`
    (also inside a Hugging Face cache snapshot); None when the path does not have that layout."""
    folder = Path(folder)
    parts = folder.parts
    if len(parts) < 4 or not _GEMMA_SCOPE_ID_RE.match("/".join(parts[-3:])):
        return None
    above = parts[:-3]
    # models--google--gemma-scope-2b-pt-res/snapshots/<commit>/layer_20/... in the hub cache
    candidates = [above[-1]] + ([above[-3]] if len(above) >= 3 and above[-2] == "snapshots" else [])
    for name in candidates:
        if m := _LOCAL_RELEASE_RE.match(name):
            return parse_gemma_scope(f"google/{m.group(1)}/{'/'.join(parts[-3:])}")
    return None


def width_label(d_sae: int) -> str:
    """The width segment of the Gemma Scope layout: 16384 -> '16k', 1048576 -> '1m', 300 -> '300'."""
    if d_sae % (1 << 20) == 0:
        return f"{d_sae >> 20}m"
    return f"{d_sae >> 10}k" if d_sae % (1 << 10) == 0 else str(d_sae)


def canonical_variant(variants: list[str]) -> str:
    """The average_l0_N name whose N is closest to 100 (ties: the sparser one)."""
    return min(variants, key=lambda v: (abs(_l0(v) - CANONICAL_L0), _l0(v)))


def resolve_canonical(path: GemmaScopePath) -> str:
    """The average_l0_N variant a canonical Gemma Scope name stands for, from the repo's file listing."""
    prefix = f"layer_{path.layer}/width_{path.width}"
    variants = [p.variant for p in _hub_saes(path.repo_id) if (p.layer, p.width) == (path.layer, path.width)]
    if not variants:
        raise SAELoadError(f"No SAE variants found under {path.repo_id}/{prefix} (hub unreachable and nothing cached?).")
    return canonical_variant(variants)


def is_pattern(source: str) -> bool:
    return bool(_GLOB_CHARS.search(source))


def read_sae_list(path: str | Path) -> list[str]:
    """The sources of an --sae-list file: one a line, surrounding spaces stripped, '#' comments and blank lines skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SAELoadError(f"SAE list {str(path)!r} is not a file: give a text file with one SAE source or pattern per line.")
    lines = (line.split("#", 1)[0].strip() for line in file.read_text().splitlines())
    return [line for line in lines if line]


def expand_sae_sources(sources: list[str], sae_list: str | Path | None = None) -> list[str]:
    """Concrete SAE sources for `sources` followed by the lines of `sae_list`, in that order: a pattern becomes
    its matches (forward-pass order), any other source stays as given; a source named twice is kept once."""
    entries = [*sources, *(read_sae_list(sae_list) if sae_list is not None else [])]
    expanded = [match for entry in entries for match in expand_sae_source(entry)]
    return list(dict.fromkeys(expanded))


def expand_sae_source(source: str) -> list[str]:
    """One source -> the concrete sources it names (itself, unless it is a pattern or a local `.../canonical`)."""
    if _split_gemma_scope(source) is not None:
        return _expand_hub(source) if is_pattern(source) else [source]
    path = Path(source).expanduser()
    if is_pattern(source) or (path.name == "canonical" and not path.exists()):
        return _expand_local(source)
    return [source]


def _expand_hub(pattern: str) -> list[str]:
    repo_id, id_pattern = _split_gemma_scope(pattern)
    segments = id_pattern.split("/")
    if len(segments) != 3:
        raise SAELoadError(f"Pattern {pattern!r}: expected three segments after the release, like "
                           "'layer_*/width_16k/canonical' or 'layer_*/width_16k/average_l0_*'.")
    saes = _hub_saes(repo_id)
    if segments[2] == "canonical":
        matches = _canonical_of_each(saes, segments[:2])
    else:
        matches = [p for p in saes if _segments_match(p.folder.split("/"), segments)]
    if not matches:
        raise SAELoadError(f"Pattern {pattern!r} matches no SAE in {repo_id} "
                           f"({len(saes)} SAEs listed; hub unreachable and nothing cached lists none).")
    matches.sort(key=lambda p: _flow_sort_key(p.site, p.folder))
    return [f"{p.repo_id}/{p.folder}" for p in matches]


def _expand_local(pattern: str) -> list[str]:
    path = os.path.expanduser(pattern)
    canonical = Path(path).name == "canonical"
    base = str(Path(path).parent) if canonical else path
    if is_pattern(base):
        found = sorted(glob.glob(base))
    else:
        found = [base] if os.path.isdir(base) else []
    if canonical:
        matches = []
        for width_dir in found:
            variants = [p.parent.name for p in Path(width_dir).glob(f"average_l0_*/{PARAMS_FILE}")]
            if variants:
                matches.append(str(Path(width_dir) / canonical_variant(variants)))
    else:
        matches = [m for m in found if _is_sae_path(Path(m))]
    if not matches:
        what = f"{len(found)} paths, none an SAE folder or params.npz" if found else "no file or folder"
        raise SAELoadError(f"Pattern {pattern!r} matches {what}: check the path "
                           "(e.g. path/to/gemma-scope-2b-pt-res/layer_*/width_16k/average_l0_*).")
    return sorted(matches, key=lambda m: _flow_sort_key(_local_site(Path(m)), m))


def _canonical_of_each(saes: list[GemmaScopePath], segments: list[str]) -> list[GemmaScopePath]:
    by_layer_width: dict[tuple[int, str], list[str]] = {}
    for p in saes:
        if _segments_match(p.folder.split("/")[:2], segments):
            by_layer_width.setdefault((p.layer, p.width), []).append(p.variant)
    return [GemmaScopePath(saes[0].repo_id, layer, width, canonical_variant(variants))
            for (layer, width), variants in by_layer_width.items()]


def _hub_saes(repo_id: str) -> list[GemmaScopePath]:
    """Every SAE (a folder holding params.npz) in a Gemma Scope repo."""
    folders = (f.removesuffix("/" + PARAMS_FILE) for f in _repo_files(repo_id) if f.endswith("/" + PARAMS_FILE))
    return [GemmaScopePath(repo_id, int(m.group(1)), m.group(2), m.group(3))
            for folder in folders if (m := _GEMMA_SCOPE_ID_RE.match(folder))]


def _repo_files(repo_id: str) -> list[str]:
    """A hub repo's file paths: from the hub when it answers, else those of its cached snapshot."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo_id)
        except hub_errors.RepositoryNotFoundError as exc:
            raise SAELoadError(f"No repo {repo_id!r} on the Hugging Face hub.") from exc
        except Exception:  # unreachable hub: fall back to what is cached
            pass
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return []
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _segments_match(parts: list[str], patterns: list[str]) -> bool:
    return len(parts) == len(patterns) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, patterns))


def _is_sae_path(path: Path) -> bool:
    """What load_sae reads: a params.npz file, or a folder holding params.npz or a SAELens cfg.json."""
    if path.is_dir():
        return (path / PARAMS_FILE).is_file() or (path / "cfg.json").is_file()
    return path.suffix == ".npz" and path.is_file()


def _local_site(path: Path) -> Site | None:
    layout = gemma_scope_layout(path.parent if path.suffix == ".npz" else path)
    return layout.site if layout else None


def _flow_sort_key(site: Site | None, text: str) -> tuple:
    """Forward-pass order when the site is known (unknown ones last), then the name with numbers as numbers."""
    return (flow_key(site.layer, site.kind) if site else (float("inf"), 0), _natural_key(text))


def _natural_key(text: str) -> tuple:
    """'layer_2' before 'layer_10', 'width_16k' before 'width_1m'."""
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20}
    return tuple((0, int(n) * scale[unit], "") if n else (1, 0, rest)
                 for n, unit, rest in re.findall(r"(\d+)([km]?)|(\D+)", text))


def _l0(variant: str) -> int:
    return int(variant.rsplit("_", 1)[1])
