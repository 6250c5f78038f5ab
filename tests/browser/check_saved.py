"""After the browser run: the saved notebook's dashboard output carries a static copy (inline
SVG) next to the widget view, showing the re-pinned plan; the notebook carries the widget state
(make lab's settings save it, so JupyterLab redraws the dashboard without a kernel); nbconvert's
HTML shows the dashboard: the static copy, or, where the widget state is saved, the widgets drawn
from it (nbconvert then prefers them, with their scripts from a CDN)."""

import subprocess
import sys

import nbformat

from nb_offload.views import TIER_COLORS

WIDGET = "application/vnd.jupyter.widget-view+json"


def main(folder):
    nb = nbformat.read(f"{folder}/widgets.ipynb", as_version=4)
    shown = [o for o in nb.cells[1].outputs if WIDGET in o.get("data", {})]
    assert shown, "the dashboard cell has no widget output"
    html = shown[-1]["data"].get("text/html", "")
    assert "nb_offload layer map" in html and "<svg" in html, "no static layer map in the saved output"
    assert "nb_offload timeline" in html and "<rect" in html, "no static timeline in the saved output"
    # Two blocks pinned to disk at load, two more by the click: four disk cells, all pinned.
    disk_cells = html.count(f"rx='3' fill='{TIER_COLORS['disk']}'")
    assert disk_cells == 4, f"static map shows {disk_cells} disk units, expected 4 after the re-pin"
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--log-level", "WARN",
                    f"{folder}/widgets.ipynb"], check=True)
    with open(f"{folder}/widgets.html") as fh:
        page = fh.read()
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert any(m.get("state", {}).get("_kind") == "layermap" for m in state.values()), "no saved widget state"
    assert ("nb_offload layer map" in page and "<svg" in page) or "application/vnd.jupyter.widget-state+json" in page, \
        "nbconvert's HTML lacks both the static views and the widget state"
    print("saved notebook: static layer map and timeline present, widget state saved, nbconvert renders them")


if __name__ == "__main__":
    main(sys.argv[1])
