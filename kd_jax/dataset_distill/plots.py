"""PNG figures of a distillation run (matplotlib, Agg backend)."""
import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_image_grid(path, images: np.ndarray, *, num_classes: int, ipc: int,
                    max_per_class: int = 10) -> None:
  """One row per class, up to `max_per_class` images each. images `[classes·ipc, H, W, C]`
  in display space (e.g. after un-normalising / ZCA inverse); each image is min-max scaled."""
  plt = _pyplot()
  cols = min(ipc, max_per_class)
  fig, axes = plt.subplots(num_classes, cols, figsize=(cols * 0.9, num_classes * 0.9),
                           squeeze=False)
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
  plt.close(fig)


def save_accuracy_curve(path, iterations, means, stds, *, references: dict | None = None,
                        title: str = "") -> None:
  """Test accuracy (mean ± std over networks) against distillation iteration; `references`
  maps a label to a horizontal line (e.g. random real subset, full data)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
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
  plt.close(fig)
