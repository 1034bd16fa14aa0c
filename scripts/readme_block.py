"""README's generated blocks: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`,
which the scripts of this folder write and tests/test_readme_numbers.py reads back."""

from __future__ import annotations

import textwrap
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of block `name` (the start with its line break)."""
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def write_block(readme: Path, name: str, block: str, required: bool = True) -> None:
    """Put `block` between the markers of `name` in `readme`, replacing what was there.
    Without the markers: SystemExit if `required`, else nothing is written."""
    start, end = markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        if required:
            raise SystemExit(f"{readme} has no {name} markers")
        return
    head, rest = text.split(start, 1)
    readme.write_text(head + start + block + "\n" + end + rest.split(end, 1)[1])


def write_blocks(readme: Path, blocks: dict[str, str]) -> None:
    """write_block for each {name: block} (every block's markers required)."""
    for name, block in blocks.items():
        write_block(readme, name, block)


def _percent(share: float) -> str:
    """A share in per cent, two significant figures below 10 %: 0.2434 -> '24', 0.0969 -> '9.7'."""
    return f"{100 * share:.1f}" if share < 0.1 else f"{100 * share:.0f}"


def _sent(row: dict) -> float:
    return row["sent_images"] / row["images"]


def opening_blocks(plain: dict, fmnist: dict, cluttered: dict) -> dict[str, str]:
    """README's sentences about both shipped pairs' default points, from the results JSON
    that the opening table and the demo lines come from: {block name: text}.

    plain: the Fashion-MNIST default point's test row; fmnist, cluttered: the results of
    scripts/fmnist_results.py and scripts/cluttered_results.py. The random selection compared
    with attention's is the cluttered results' own row of it, calibrated to the default
    point's sent canvases and patch count."""
    busy = cluttered["default_test"]
    total = busy["num_patches"]
    random = next(r for r in cluttered["rows"]
                  if r["policy"] == "random" and r["measure"] == busy["measure"])  # fmt: skip
    k = int(random["threshold"])
    attended, drawn = (cluttered["recall"][name][k - 1] for name in ("mean", "random"))
    edge, edge_busy = fmnist["edge_alone"], cluttered["edge_alone"]
    server = next(r["collab_acc"] for r in fmnist["rows"] if r["policy"] == "all patches")
    gap = random["collab_acc"] - edge_busy
    opening = (
        "On Fashion-MNIST a garment fills its frame, so the gate does the work: the edge "
        f"answers {_percent(1 - _sent(plain))} % of the images itself and sends the other "
        f"{_percent(_sent(plain))} % with {plain['sent_tokens']:.1f} of their "
        f"{plain['num_patches']} patches. On [cluttered canvases]"
        "(#cluttered-fashion-mnist-where-which-patches-matter), where the item covers "
        f"{cluttered['item_patches']:.1f} of the {total} patches among fragments of others, the "
        f"selection matters too: the edge sends {_percent(_sent(busy))} % of the canvases with "
        f"{busy['sent_tokens']:.1f} of their {total} patches, its attention puts the item's "
        f"patches first (its {k} most attended patches hold {_percent(attended)} % of the "
        f"item's, {k} random ones {_percent(drawn)} %), and the same canvases sent with {k} "
        f"random patches would give {random['collab_acc']:.2f} %, {abs(gap):.2f} pt "
        f"{'below' if gap < 0 else 'above'} the edge alone ({edge_busy:.2f} %), where the "
        f"attended patches give {busy['collab_acc']:.2f} %."
    )  # fmt: skip
    demo = (
        f"The edge answers {_percent(1 - _sent(plain))} % of the images itself; the other "
        f"{_percent(_sent(plain))} % go to the server with {plain['sent_tokens']:.1f} of their "
        f"{plain['num_patches']} patches: collaborative accuracy {plain['collab_acc']:.2f} % "
        f"against {edge:.2f} % for the edge alone and {server:.2f} % for the server alone on "
        f"every patch of every image, at {_percent(plain['comm_cost'])} % of the traffic. On "
        f"the cluttered canvases the edge answers {_percent(1 - _sent(busy))} % itself and "
        f"sends the other {_percent(_sent(busy))} % with {busy['sent_tokens']:.1f} of their "
        f"{total} patches: {busy['collab_acc']:.2f} % against {edge_busy:.2f} % for the edge "
        f"alone and {cluttered['server_alone']:.2f} % for the server on whole canvases, at "
        f"{_percent(busy['comm_cost'])} % of the traffic."
    )  # fmt: skip
    return {"opening-prose": _wrap(opening), "demo-prose": _wrap(demo)}


def _wrap(text: str) -> str:
    """`text` in lines of at most 95 characters, as the README's prose is: never inside a
    word or a link's anchor, nor between a number and its unit."""
    joined = text.replace(" %", "\u00a0%").replace(" pt", "\u00a0pt")
    lines = textwrap.fill(joined, 95, break_long_words=False, break_on_hyphens=False)
    return lines.replace("\u00a0", " ")
