"""Cross-layer links in the explorer: the feature page's upstream/downstream lists and their JSON twin,
the lineage view (graph and JSON) with its depth/breadth/by parameters, runs computed without links, and
databases at an older schema revision, which `featurescope db upgrade` makes servable again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command

from factories import SAESpec, make_app_client, make_db, parse_html, shared_data_dir
from featurescope import db as fsdb

MODEL = "tiny-gemma-2"
RES_SAES = (SAESpec("1-res-16", 1, "res", 16), SAESpec("2-res-16", 2, "res", 16), SAESpec("2-mlp-12", 2, "mlp", 12),
            SAESpec("3-res-16", 3, "res", 16), SAESpec("5-res-16", 5, "res", 16))


@pytest.fixture(scope="module")
def client():
    with make_app_client(shared_data_dir()) as c:
        yield c


@pytest.fixture(scope="module")
def res_client(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    make_db(root / "db" / "res.duckdb", model_id="res-model", saes=RES_SAES, n_contexts=24, context_len=16)
    with make_app_client(root) as c:
        yield c


def test_feature_json_lists_upstream_and_downstream_links(client):
    links = client.get(f"/{MODEL}/4-mlp-48/3.json").json()["links"]
    assert links["computed"] is True
    assert {item["sae_id"] for item in links["upstream"]} == {"2-res-64"}
    assert {item["sae_id"] for item in links["downstream"]} == {"6-att-32"}
    assert links["alongside"] == []
    for item in links["upstream"] + links["downstream"]:
        assert set(item) >= {"sae_id", "layer", "site", "feature", "label", "coact", "coact_rel", "cosine"}
        assert item["cosine"] is None  # res -> mlp -> att: no pair shares the residual basis
        target = client.get(f"/{MODEL}/{item['sae_id']}/{item['feature']}.json").json()
        assert target["label"] == item["label"]
    scores = [item["coact_rel"] for item in links["downstream"]]
    assert scores == sorted(scores, reverse=True)


def test_weight_links_carry_cosines_between_residual_saes(res_client):
    links = res_client.get("/res-model/2-res-16/4.json").json()["links"]
    by_sae = {}
    for group in ("upstream", "downstream", "alongside"):
        for item in links[group]:
            by_sae.setdefault((group, item["sae_id"]), []).append(item)
    # neighbours: the previous and next layer with an SAE (1, 3) and the same layer (2-mlp, upstream of 2-res)
    assert set(by_sae) == {("upstream", "1-res-16"), ("upstream", "2-mlp-12"), ("downstream", "3-res-16")}
    assert all(item["cosine"] is not None for item in by_sae[("downstream", "3-res-16")])
    assert all(item["cosine"] is None for item in by_sae[("upstream", "2-mlp-12")])
    assert "5-res-16" not in {sae for _, sae in by_sae}  # two layers away


def test_feature_page_links_open_feature_pages_and_the_lineage(client):
    document = parse_html(client.get(f"/{MODEL}/4-mlp-48/3").text)
    panel = document.find("section", id="links")
    assert [h.text() for h in panel.find_all("h3")] == ["Upstream", "Downstream"]
    hrefs = [a.attrs["href"] for a in panel.find_all("a")]
    assert f"/{MODEL}/4-mlp-48/3/-/lineage" in hrefs
    for href in hrefs:
        assert client.get(href).status_code == 200, href


def test_lineage_follows_the_strongest_links_through_every_sae(client):
    view = client.get(f"/{MODEL}/4-mlp-48/3/-/lineage.json").json()
    assert [c["sae_ids"] for c in view["columns"]] == [["2-res-64"], ["4-mlp-48"], ["6-att-32"]]
    start = [n for n in view["nodes"] if n["start"]]
    assert [(n["sae_id"], n["feature"]) for n in start] == [("4-mlp-48", 3)]
    per_column = {}
    for node in view["nodes"]:
        per_column.setdefault(node["column"], []).append(node)
        assert node["top_tokens"] and set(node["top_tokens"][0]) == {"token_id", "text", "count"}
    assert [len(per_column[c]) for c in sorted(per_column)] == [3, 1, 3]  # breadth 3 each way
    ids = {n["id"] for n in view["nodes"]}
    assert view["edges"] and all(e["from"] in ids and e["to"] in ids for e in view["edges"])
    # the chosen downstream features are the start's three strongest downstream links
    links = client.get(f"/{MODEL}/4-mlp-48/3.json").json()["links"]["downstream"]
    strongest = sorted(links, key=lambda item: -item["coact_rel"])[:3]
    assert {n["feature"] for n in per_column[2]} == {item["feature"] for item in strongest}


def test_lineage_depth_breadth_and_score_are_url_parameters(res_client):
    view = res_client.get("/res-model/1-res-16/2/-/lineage.json", params={"breadth": 1}).json()
    chain = [(n["sae_id"], n["feature"]) for n in view["nodes"]]
    assert [sae for sae, _ in chain] == ["1-res-16", "2-mlp-12", "2-res-16", "3-res-16", "5-res-16"]
    assert len(view["edges"]) == 4
    short = res_client.get("/res-model/1-res-16/2/-/lineage.json", params={"depth": 2, "breadth": 2}).json()
    assert [c["sae_ids"] for c in short["columns"]] == [["1-res-16"], ["2-mlp-12"], ["2-res-16"]]
    by_weights = res_client.get("/res-model/2-res-16/2/-/lineage.json", params={"by": "cosine", "breadth": 2}).json()
    assert by_weights["query"] == {"depth": None, "breadth": 2, "by": "cosine"}
    # 2-mlp has no cosine with 2-res (not both residual): the walk upstream goes on to the nearest SAE it links to
    assert [c["sae_ids"] for c in by_weights["columns"]] == [["1-res-16"], ["2-res-16"], ["3-res-16"], ["5-res-16"]]
    assert all(e["cosine"] is not None for e in by_weights["edges"])
    page = res_client.get("/res-model/2-res-16/2/-/lineage", params={"depth": "", "breadth": 2})
    assert page.status_code == 200


@pytest.mark.parametrize("params", [{"breadth": 0}, {"breadth": 9}, {"depth": -1}, {"by": "magic"}])
def test_bad_lineage_parameters_are_422(client, params):
    assert client.get(f"/{MODEL}/4-mlp-48/3/-/lineage.json", params=params).status_code == 422
    assert client.get(f"/{MODEL}/4-mlp-48/3/-/lineage", params=params).status_code == 422


def test_unknown_feature_lineage_is_404(client):
    assert client.get(f"/{MODEL}/4-mlp-48/48/-/lineage.json").status_code == 404
    assert client.get(f"/{MODEL}/4-mlp-48/x/-/lineage").status_code == 404
    assert client.get(f"/{MODEL}/nope/1/-/lineage").status_code == 404


def test_lineage_page_draws_every_node_with_a_link(client):
    view = client.get(f"/{MODEL}/2-res-64/0/-/lineage.json").json()
    document = parse_html(client.get(f"/{MODEL}/2-res-64/0/-/lineage").text)
    svg = document.find("svg", cls="lineage")
    nodes = svg.find_all("a", cls="node")
    assert {a.attrs["data-node"] for a in nodes} == {n["id"] for n in view["nodes"]}
    assert {a.attrs["href"] for a in nodes} == {f"/{MODEL}/{n['sae_id']}/{n['feature']}" for n in view["nodes"]}
    assert len(svg.find_all("path", cls="edge")) == len(view["edges"])
    # feature 0 fires on and promotes hostile tokens: its label shows as text, never as markup
    start = next(n for n in view["nodes"] if n["start"])
    assert "<script>alert(1)</script>" in start["label"] and "<script>alert(1)</script>" in svg.text()
    assert not [e for e in document.iter() if e.tag == "script" and e.text().strip()]
    assert not [e for e in document.iter() if any(name.startswith("on") for name in e.attrs)]


def test_an_older_database_is_listed_as_a_problem_until_db_upgrade_brings_it_back_unchanged(tmp_path):
    saes = (SAESpec("1-res-8", 1, "res", 8), SAESpec("2-res-8", 2, "res", 8))
    current = make_db(tmp_path / "current" / "db" / "old.duckdb", model_id="old", saes=saes)
    with make_app_client(current.parent.parent) as client:
        before = {url: client.get(url).json() for url in ("/old/1-res-8/2.json", "/old/2-res-8/5.json", "/old/1-res-8.json")}
    assert before["/old/1-res-8/2.json"]["links"]["downstream"]
    path = tmp_path / "db" / "old.duckdb"
    path.parent.mkdir()
    shutil.copy(current, path)
    cfg = fsdb.alembic_config(path)
    engine = fsdb.engine_for(path)
    with engine.begin() as connection:  # schema 0003: examples and links in their own tables
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0003")
    engine.dispose()
    assert fsdb.current_revision(path) == "0003"
    served_old = tmp_path / "served-old" / "db" / "old.duckdb"  # a copy: a closed test app may still hold its file
    served_old.parent.mkdir(parents=True)
    shutil.copy(path, served_old)
    with make_app_client(served_old.parent.parent) as client:
        problems = client.get("/-/health").json()["problems"]
        assert len(problems) == 1 and f"featurescope db upgrade {served_old}" in problems[0]["error"]
        assert client.get("/old/1-res-8/2.json").status_code == 404
        assert "served from a newer file" not in problems[0]["error"]
    shutil.copy(current, served_old.parent / "new.duckdb")  # the same SAEs, published again at this revision
    with make_app_client(served_old.parent.parent) as client:
        problems = client.get("/-/health").json()["problems"]
        assert len(problems) == 1 and problems[0]["error"].endswith("served from a newer file, so it can also be deleted")
        page = client.get("/old/1-res-8/2.json").json()
        assert page["sae"]["database"] == "new"
        assert {**page, "sae": {**page["sae"], "database": "old"}} == before["/old/1-res-8/2.json"]
    upgrade = subprocess.run([str(Path(sys.executable).parent / "featurescope"), "db", "upgrade", str(path)],
                             capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    with make_app_client(tmp_path) as client:
        assert client.get("/-/health").json()["problems"] == []
        assert {url: client.get(url).json() for url in before} == before


def test_a_run_without_links_says_so(tmp_path):
    make_db(tmp_path / "db" / "nolinks.duckdb", model_id="nolinks", saes=(SAESpec("1-res-8", 1, "res", 8),
                                                                          SAESpec("2-res-8", 2, "res", 8)),
            config={"links": False})
    with make_app_client(tmp_path) as client:
        links = client.get("/nolinks/1-res-8/2.json").json()["links"]
        assert links["computed"] is False
        page = parse_html(client.get("/nolinks/1-res-8/2").text)
        assert "without cross-layer links" in page.find("section", id="links").text()
        view = client.get("/nolinks/1-res-8/2/-/lineage.json").json()
        assert view["links_computed"] is False and [n["id"] for n in view["nodes"]] == ["1-res-8/2"]
        assert client.get("/nolinks/1-res-8/2/-/lineage").status_code == 200
