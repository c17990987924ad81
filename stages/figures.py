"""Stage figures@<prompt id>: a static picture of the pruned graph -> results/<id>/graph.{png,svg}.

Drawn from the graph JSON the export stage wrote (``pipeline.figures``: layers bottom to top,
tokens left to right, nodes sized by influence, edges coloured by sign and sized by weight,
the prompt under it and the top logits above), for papers and CI: no browser needed.
Deterministic: the same graph gives byte-identical files.

The graph JSON's path comes on the command line (dvc.yaml spells it with
``export.slug_prefix``), so the stage reads no params: DVC reruns it when that path changes,
and a no-op ``dvc repro`` need not parse params.yaml for it.
"""

from __future__ import annotations

from pipeline.figures import write_graph_figures
from stages._config import parse_args
from stages._io import prompt_dir


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv, graph="the prompt's graph JSON (export's output)")
    paths = write_graph_figures(args.graph, prompt_dir(args.prompt_id), stem="graph")  # atomic
    print(f"figures: {'  '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
