"""Layout of the lineage graph (templates/_lineage_graph.html draws it as inline SVG, so every text
goes through Jinja's autoescape): one column per site in model order, nodes stacked in each column
strongest first, edges as curves whose width grows with their score.

    layout = lineage_layout(data.lineage_view(...))   # {"width", "height", "columns", "nodes", "edges"}
"""

from __future__ import annotations

from typing import Any

NODE_W, NODE_H = 188, 66
COL_GAP, ROW_GAP, MARGIN, HEADER = 56, 16, 12, 22
LABEL_CHARS, TOKENS_CHARS = 26, 28


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def lineage_layout(view: dict[str, Any]) -> dict[str, Any]:
    columns = [c["column"] for c in view["columns"]]
    x_of = {c: MARGIN + i * (NODE_W + COL_GAP) for i, c in enumerate(columns)}
    rows: dict[int, int] = {}
    nodes, where = [], {}
    for node in view["nodes"]:  # already in column order, start first, then strongest first
        row = rows.get(node["column"], 0)
        rows[node["column"]] = row + 1
        x, y = x_of[node["column"]], MARGIN + HEADER + row * (NODE_H + ROW_GAP)
        where[node["id"]] = (x, y)
        tokens = " ".join(t["text"].strip() or repr(t["text"]) for t in node["top_tokens"])
        nodes.append({**node, "x": x, "y": y, "title": f"{node['sae_id']} #{node['feature']}",
                      "short_label": clip(node["label"] or "(no label)", LABEL_CHARS),
                      "short_tokens": clip(tokens, TOKENS_CHARS)})
    score_key = "coact_rel" if view["query"]["by"] == "coact" else "cosine"
    top = max((abs(e[score_key] or 0.0) for e in view["edges"]), default=0.0) or 1.0
    edges = []
    for edge in view["edges"]:
        (x1, y1), (x2, y2) = where[edge["from"]], where[edge["to"]]
        x1, y1, y2 = x1 + NODE_W, y1 + NODE_H / 2, y2 + NODE_H / 2
        bend = (x2 - x1) / 2
        edges.append({**edge, "path": f"M{x1:g},{y1:g} C{x1 + bend:g},{y1:g} {x2 - bend:g},{y2:g} {x2:g},{y2:g}",
                      "width": round(1.0 + 4.0 * abs(edge[score_key] or 0.0) / top, 2)})
    heads = [{"x": x_of[c["column"]], "text": " · ".join(c["sae_ids"])} for c in view["columns"]]
    width = MARGIN * 2 + max(len(columns), 1) * (NODE_W + COL_GAP) - COL_GAP
    height = MARGIN * 2 + HEADER + max(rows.values(), default=1) * (NODE_H + ROW_GAP) - ROW_GAP
    return {"width": width, "height": height, "node_w": NODE_W, "node_h": NODE_H, "columns": heads,
            "nodes": nodes, "edges": edges}
