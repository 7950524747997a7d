"""Convert between ComfyUI's two workflow formats, driven by the server's ``/object_info``.

API format (what ``POST /prompt`` takes) is the single source of truth for the example workflows;
the UI format (what the frontend loads and shows as a template) is generated from it, and the tests
convert UI files back to check that both still match every node's current schema.
"""

from __future__ import annotations

from typing import Any

# The value of the widget the frontend adds after a seed (and serialises into widgets_values).
CONTROL_AFTER_GENERATE = "fixed"

# Node heights as the frontend (1.32) lays nodes out, in graph units: it grows a node that is too
# small for its widgets on load, so a file with one fixed size gets nodes drawn over each other.
NODE_WIDTH = 320
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
MULTILINE_HEIGHT = 60
IMAGE_UPLOAD_HEIGHT = 270  # the upload button and the preview of the chosen image
OUTPUT_NODE_HEIGHT = 260  # room for the images an output node shows after a run
COLUMN_GAP = 40
# Widgets that extensions add in the browser, unknown to /object_info: the pack's live training panel.
FRONTEND_WIDGET_HEIGHT = {"DreamBoothTrain": 300}


def _ordered_inputs(info: dict[str, Any]) -> list[tuple[str, list[Any], bool]]:
    """(name, spec, optional) in the order the frontend builds widgets and sockets."""
    order = info.get("input_order") or {}
    out = []
    for section, optional in (("required", False), ("optional", True)):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, list(specs)):
            out.append((name, specs[name], optional))
    return out


def is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return True  # old-style combo: a list of options
    return kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widget_values(spec: list[Any], value: Any) -> list[Any]:
    values = [value]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("control_after_generate"):
        values.append(CONTROL_AFTER_GENERATE)
    if options.get("image_upload"):
        values.append("image")
    return values


def node_height(class_type: str, info: dict[str, Any]) -> int:
    """The body height (without title) the frontend gives a node of this type, or a little more."""
    sockets = 0
    widgets = 0
    for _name, spec, _optional in _ordered_inputs(info):
        if not is_widget(spec):
            sockets += 1
            continue
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if options.get("multiline"):
            widgets += MULTILINE_HEIGHT
        elif options.get("image_upload"):
            widgets += IMAGE_UPLOAD_HEIGHT
        else:
            widgets += WIDGET_HEIGHT * len(widget_values(spec, None))
    height = 14 + SLOT_HEIGHT * max(sockets, len(info.get("output", [])), 1) + widgets
    height += FRONTEND_WIDGET_HEIGHT.get(class_type, 0)
    if not info.get("output"):
        height = max(height, OUTPUT_NODE_HEIGHT)
    return height


def _stack_columns(nodes: list[dict[str, Any]]) -> None:
    """Push nodes down within each column (same x) until no node overlaps the one above it."""
    columns: dict[int, list[dict[str, Any]]] = {}
    for node in nodes:
        columns.setdefault(node["pos"][0], []).append(node)
    for column in columns.values():
        bottom = None
        for node in sorted(column, key=lambda n: n["pos"][1]):
            if bottom is not None:
                node["pos"][1] = max(node["pos"][1], bottom + TITLE_HEIGHT + COLUMN_GAP)
            bottom = node["pos"][1] + node["size"][1]


def _is_link(value: Any, ids: dict[str, int]) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in ids


def api_to_ui(prompt: dict[str, dict[str, Any]], object_info: dict[str, Any],
              positions: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """A LiteGraph (frontend) workflow for an API-format prompt."""
    ids = {node_id: i + 1 for i, node_id in enumerate(prompt)}
    links: list[list[Any]] = []
    outgoing: dict[tuple[int, int], list[int]] = {}
    nodes = []
    for order, (node_id, node) in enumerate(prompt.items()):
        info = object_info[node["class_type"]]
        uid = ids[node_id]
        inputs: list[dict[str, Any]] = []
        widgets: list[Any] = []
        for name, spec, optional in _ordered_inputs(info):
            value = node["inputs"].get(name)
            link_id = None
            if _is_link(value, ids):
                link_id = len(links) + 1
                link_type = object_info[prompt[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, ids[value[0]], value[1], uid, len(inputs), link_type])
                outgoing.setdefault((ids[value[0]], value[1]), []).append(link_id)
            if is_widget(spec):
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if link_id is not None:
                    inputs.append({"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0],
                                   "widget": {"name": name}, "link": link_id})
                widgets += widget_values(spec, options.get("default") if link_id is not None or value is None
                                         else value)
            else:
                entry: dict[str, Any] = {"name": name, "type": spec[0], "link": link_id}
                if optional:
                    entry["shape"] = 7  # the frontend draws optional sockets hollow
                inputs.append(entry)
        pos = (positions or {}).get(node_id, (60 + 360 * (order % 4), 80 + 420 * (order // 4)))
        nodes.append({
            "id": uid, "type": node["class_type"], "pos": list(pos),
            "size": [NODE_WIDTH, node_height(node["class_type"], info)], "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
            **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
        })
    _stack_columns(nodes)
    for node in nodes:
        info = object_info[node["type"]]
        node["outputs"] = [
            {"name": info["output_name"][i], "type": t, "links": outgoing.get((node["id"], i), []), "slot_index": i}
            for i, t in enumerate(info["output"])
        ]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt a UI workflow stands for; raises ValueError naming what does not fit the schema."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: unknown node type {kind!r}")
        info = object_info[kind]
        sockets = {entry["name"]: entry for entry in node.get("inputs", [])}
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for name, spec, optional in _ordered_inputs(info):
            socket = sockets.get(name)
            if is_widget(spec):
                if not values:
                    raise ValueError(f"node {node['id']} ({kind}): no widget value for {name!r}")
                value = values.pop(0)
                for _extra in widget_values(spec, value)[1:]:
                    if not values:
                        raise ValueError(f"node {node['id']} ({kind}): missing companion widget of {name!r}")
                    values.pop(0)
                if socket is None or socket.get("link") is None:
                    inputs[name] = value
                    continue
            if socket is None or socket.get("link") is None:
                if not optional and not is_widget(spec):
                    raise ValueError(f"node {node['id']} ({kind}): required input {name!r} is not connected")
                continue
            link = links.get(socket["link"])
            if link is None:
                raise ValueError(f"node {node['id']} ({kind}): input {name!r} refers to missing link {socket['link']}")
            _, src, slot, dst, _dst_slot, link_type = link
            src_node = next(n for n in workflow["nodes"] if n["id"] == src)
            produced = object_info[src_node["type"]]["output"][slot]
            accepted = spec[0] if not isinstance(spec[0], list) else "COMBO"
            if dst != node["id"] or link_type != produced or (accepted != produced and not is_widget(spec)
                                                               and "*" not in (accepted, produced)):
                raise ValueError(f"node {node['id']} ({kind}): link {link[0]} carries {produced}, "
                                 f"input {name!r} takes {accepted}")
            inputs[name] = [str(src), slot]
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget value(s) left over: {values}")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
