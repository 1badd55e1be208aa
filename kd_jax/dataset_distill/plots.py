"""PNG figures of a distillation run (matplotlib `Figure` objects without pyplot: no backend is
switched, so a notebook's own plots still show)."""
import numpy as np
from matplotlib.figure import Figure


def save_image_grid(path, images: np.ndarray, *, num_classes: int, ipc: int,
                    max_per_class: int = 10) -> None:
  """One row per class, up to `max_per_class` images each. images `[classes·ipc, H, W, C]`
  in display space (e.g. after un-normalising / ZCA inverse); each image is min-max scaled."""
  cols = min(ipc, max_per_class)
  fig = Figure(figsize=(cols * 0.9, num_classes * 0.9))
  axes = fig.subplots(num_classes, cols, squeeze=False)
  for c in range(num_classes):
    for j in range(cols):
      img = images[c * ipc + j]
      img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
      ax = axes[c][j]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(str(c), rotation=0, labelpad=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def save_accuracy_curve(path, iterations, means, stds, *, references: dict | None = None,
                        title: str = "") -> None:
  """Test accuracy (mean ± std over networks) against distillation iteration; `references`
  maps a label to a horizontal line (e.g. random real subset, full data)."""
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  means, stds = np.asarray(means) * 100, np.asarray(stds) * 100
  ax.errorbar(iterations, means, yerr=stds, marker="o", capsize=3, label="distilled")
  for i, (name, value) in enumerate((references or {}).items()):
    ax.axhline(value * 100, linestyle="--", color=f"C{i + 1}", label=name)
  ax.set_xlabel("distillation iteration")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
