"""How often the teacher names the intended class of each distilled set's images, clean and
under DSA (what the teacher soft-label protocol trains on).

    PYTHONPATH=. python benchmarks/dd_teacher_agreement.py --workdir=/tmp/dd_methods

Reads the workdirs `benchmarks/dd_methods_table.py` wrote (their `distilled.npz` and the shared
teacher) and prints, per set, the fraction of images whose teacher argmax is their class and the
teacher's mean probability of that class at T = 4, on the clean images and over 20 DSA draws.
"""
import argparse
import os

import jax
import numpy as np

from configs import dd_digits
from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill import run as run_lib
from kd_jax.dataset_distill.distilled_set import load_distilled
from kd_jax.dataset_distill.synthetic import select_real
from kd_jax.dataset_distill.teacher import TeacherRecipe, train_teacher


def agreement(teacher, images, class_ids, strategy, draws=20, temperature=4.0):
  """(argmax = class, mean p_T(class)) on the clean images and averaged over DSA draws."""
  def score(x):
    p = np.asarray(jax.nn.softmax(teacher.apply_fn(teacher.variables, x, train=False)[0].logits
                                  / temperature))
    return (p.argmax(-1) == class_ids).mean(), p[np.arange(len(class_ids)), class_ids].mean()
  augmented = [score(diff_augment(jax.numpy.asarray(images), jax.random.key(k), strategy=strategy))
               for k in range(draws)]
  return score(images), tuple(np.mean(augmented, axis=0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  config = dd_digits.get_config("ipc1,teacher_labels")
  _, (train_x, train_y), _, _ = run_lib._load_data(config)  # pylint: disable=protected-access
  t = config.teacher
  recipe = TeacherRecipe(model=t.model.name, model_kwargs=dict(t.model.kwargs), epochs=t.epochs,
                         lr=t.lr, batch_size=t.batch_size, weight_decay=t.weight_decay,
                         crop_padding=t.crop_padding)
  teacher = train_teacher(recipe, os.path.join(args.workdir, "shared"), train_x, train_y,
                          num_classes=10, seed=config.seed,
                          metadata={"dataset": "digits", "train_split": "train", "zca": False})
  sets = {"random real (IPC 1)": train_x[select_real(np.random.default_rng(config.seed + 1),
                                                     train_y, 10, 1)]}
  for name in sorted(os.listdir(args.workdir)):
    if os.path.exists(os.path.join(args.workdir, name, "distilled.npz")):
      sets[name] = load_distilled(os.path.join(args.workdir, name))[0]["images"]
  print("| set | clean: argmax = class | clean: p(class) | DSA: argmax = class | DSA: p(class) |")
  print("|---|---|---|---|---|")
  for name, images in sets.items():
    class_ids = np.repeat(np.arange(10), len(images) // 10)
    (acc, prob), (acc_aug, prob_aug) = agreement(teacher, images, class_ids, config.dsa.strategy)
    print(f"| {name} | {acc:.2f} | {prob:.2f} | {acc_aug:.2f} | {prob_aug:.2f} |")


if __name__ == "__main__":
  main()
