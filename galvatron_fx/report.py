"""Text tables for Programs (and, later, plans)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .program import Program

MB = 1e6


def layer_table(program: "Program") -> str:
    """The layer table: index, type, parameters, forward GFLOPs, saved and boundary MB per sample."""
    per_sample = 1.0 / program.batch_size
    header = ("#", "kind", "type", "module", "params", "fwd GFLOPs", "saved MB/sample", "boundary MB/sample")
    rows = []
    for layer in program.layers:
        boundary = sum(t.nbytes / (program.batch_size if t.batched else 1) for t in layer.boundary_out)
        rows.append((
            str(layer.index), layer.kind, layer.layer_type, layer.module_path or "-",
            f"{layer.stats.param_count:,}",
            f"{layer.stats.fwd_flops * per_sample / 1e9:.4f}",
            f"{layer.stats.saved_activation_bytes * per_sample / MB:.3f}",
            f"{boundary / MB:.3f}",
        ))
    total_params = sum(p.numel() for _, p in program.named_parameters())
    title = (f"{program.model_name}: {len(program.layers)} layers ({len(program.body)} body, "
             f"{len(program.layer_types())} body types), {total_params:,} parameters, "
             f"captured at batch {program.batch_size}")
    return title + "\n" + format_table(header, rows)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if _numeric(str(c)) else str(c).ljust(w) for c, w in zip(cells, widths)
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _numeric(cell: str) -> bool:
    return cell.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
