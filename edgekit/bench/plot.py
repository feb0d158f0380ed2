"""Quality vs size vs speed, one point per bundle (matplotlib, written to PNG)."""

from __future__ import annotations

from pathlib import Path

from edgekit.bench.run import BenchResult
from edgekit.errors import ConfigError


def plot_results(results: list[BenchResult], path: Path) -> Path:
    """Size on x, headline speed on y, quality as the label; one panel per format."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib", hint="pip install 'edgekit[bench]'") from exc
    formats = sorted({r.format for r in results})
    figure, axes = plt.subplots(1, len(formats), figsize=(6 * len(formats), 4.5), squeeze=False)
    for axis, fmt in zip(axes[0], formats):
        chosen = [r for r in results if r.format == fmt]
        metric = chosen[0].headline[0]
        for r in chosen:
            speed = r.headline[1]
            axis.scatter(r.bytes / 1e6, speed, s=60)
            quality = f"\n{r.quality_metric} {r.quality:.4g}" if r.quality is not None else ""
            axis.annotate(f"{r.quantization}{quality}", (r.bytes / 1e6, speed), textcoords="offset points", xytext=(6, 6), fontsize=8)
        axis.set_xlabel("bundle size (MB)")
        axis.set_ylabel(metric.replace("_", " "))
        axis.set_title(f"{fmt} bundles on this host")
        axis.grid(alpha=0.3)
        axis.margins(x=0.3, y=0.25)  # room for the labels
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
