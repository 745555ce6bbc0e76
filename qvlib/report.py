"""The run's tables and figures from its per-task and per-cell files: what `qv tables` and `qv figures`
do. Nothing here loads a model, so these steps start without importing timm or torchvision."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from . import plots, tables
from .fileio import write_parquet, write_text  # write_parquet: also imported from here (paper_tables)
from .vocab import LambdaTies


def assemble_tables(baselines: list[Path], cells: list[Path], norms: list[Path], cosine: list[Path],
                    outputs: dict[str, Path], ties: str = LambdaTies.NEAREST_ONE) -> None:
    """Every seed's and quantizer's per-task and per-cell files into the run's tables (``outputs``: table
    name -> path: baselines, transfer, donor, receiver, specific, summary_specific, norms, cosine,
    quantizers, and quantizers_md, its markdown); ``ties``: which lambda a tied pick keeps."""
    base = tables.read_all(baselines).with_columns(tables.quantized_model())
    transfer = tables.with_gain(tables.read_all(cells), base)
    pair_rows = tables.pairs(transfer, ties)
    specific = tables.specific(pair_rows)
    frames = {"baselines": base, "transfer": transfer, "donor": tables.summary_donor(pair_rows),
              "receiver": tables.summary_receiver(pair_rows), "specific": specific,
              "summary_specific": tables.summary_specific(specific),
              "norms": tables.read_all(norms), "cosine": tables.read_all(cosine),
              "quantizers": tables.quantizers(base, pair_rows)}
    for name, frame in frames.items():
        if name in outputs:
            write_parquet(frame, outputs[name])
    if "quantizers_md" in outputs:
        text = plots.quantizers_markdown(base["arch"][0], frames["quantizers"])
        write_text(outputs["quantizers_md"], text)


def of_quant(path: Path, quant: str | None) -> pl.DataFrame:
    """A table's rows of one quantizer (all rows when ``quant`` is None or the table has no column)."""
    df = tables.read_table(path)
    if quant is None or "quant" not in df.columns:
        return df
    out = df.filter(pl.col("quant") == quant)
    if not len(out):
        raise ValueError(f"{path} has no rows of quantizer {quant!r} (it has {sorted(df['quant'].unique())})")
    return out


def figures(arch_name: str, baselines: Path, transfer: Path, summary_specific: Path, norms: Path, cosine: Path,
            out_gain: Path, out_cosine: Path, out_summary: Path, quant: str | None = None,
            ties: str = LambdaTies.NEAREST_ONE) -> str:
    """The gain and cosine heatmaps and the markdown summary (returned, and written to ``out_summary``)
    of one quantizer's grid (``quant``: its tag; None: the tables hold one quantizer)."""
    pair_rows = tables.pairs(of_quant(transfer, quant), ties)
    name = f"{arch_name} {quant}" if quant else arch_name
    plots.heatmap_gain(pair_rows, out_gain, title=f"{name}: gain over PTQ (points)")
    plots.heatmap_cosine(of_quant(cosine, quant), out_cosine, title=f"{name}: cosine of quantization vectors")
    text = plots.summary_markdown(name, of_quant(baselines, quant), pair_rows, of_quant(summary_specific, quant),
                                  of_quant(norms, quant))
    write_text(out_summary, text)
    return text



def paper_tables(name: str, baselines: Path, transfer: Path, out_md: Path, out_table1: Path, out_transfer: Path,
                 quant: str | None = None, ties: str = LambdaTies.NEAREST_ONE) -> str:
    """The paper's Tables 1-3 of one quantizer's grid (qvlib.paper_tables) from a run's tables: the
    markdown (returned, and written to ``out_md``) and the Parquet of Table 1 and of Tables 2-3."""
    from .paper_tables import write_paper_tables

    pair_rows = tables.pairs(of_quant(transfer, quant), ties)
    return write_paper_tables(name, of_quant(baselines, quant), pair_rows, out_md, out_table1, out_transfer)


def update_readme(readme: Path, summary: Path | None = None, quantizers: Path | None = None) -> list[tuple[Path, str]]:
    """Replace ``readme``'s blocks (between its markers) with a run's: the quantizer comparison of
    ``quantizers`` (qv tables' markdown), and each summary block of ``summary`` (qv figures' summary.md)
    that ``readme`` has markers for (none of them is an error). Written atomically; returns the
    (source file, block name) pairs replaced, in order."""
    text = Path(readme).read_text()
    sources = [(quantizers, plots.QUANTIZERS_BLOCK)] if quantizers else []
    if summary:
        names = [name for name in plots.SUMMARY_BLOCKS if plots.has_block(text, name)]
        if not names:
            raise ValueError(f"{readme} has none of the summary's blocks ({', '.join(plots.SUMMARY_BLOCKS)}) to replace")
        sources += [(summary, name) for name in names]
    for path, name in sources:
        text = plots.replace_readme_block(text, plots.readme_block(Path(path).read_text(), name), name)
    write_text(readme, text)
    return sources
