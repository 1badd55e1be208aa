"""The teacher × student linear-CKA matrix, its heatmap, and the command on a KD workdir."""
import json
import os

import numpy as np
import pytest

from kd_jax.analysis import cka


def test_a_network_against_itself_is_one_on_the_diagonal_and_within_zero_one(mlp):
  taps = cka.taps(mlp[3])
  matrix = cka.cka_matrix(taps, taps)
  assert matrix.shape == (4, 4)
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  np.testing.assert_allclose(matrix, matrix.T, atol=1e-5)
  assert np.all(matrix >= -1e-6) and np.all(matrix <= 1 + 1e-6)
  assert matrix.min() < 0.99  # distinct layers differ


def test_invariant_to_an_orthogonal_transform_and_isotropic_scaling_of_a_tap(mlp):
  taps = cka.taps(mlp[3])
  q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((8, 8)))
  moved = {**taps, "stage2": taps["stage2"] @ q, "logits": 7.0 * taps["logits"]}
  np.testing.assert_allclose(cka.cka_matrix(taps, moved), cka.cka_matrix(taps, taps), atol=1e-5)


def test_heatmap_is_a_png(tmp_path):
  path = str(tmp_path / "cka.png")
  cka.save_heatmap(path, np.array([[1.0, 0.2], [0.5, 0.9], [0.0, 0.3]]), ["a", "b", "c"],
                   ["x", "y"], title="t")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_command_writes_the_matrix_and_heatmap_of_a_workdir(kd_workdir, tmp_path):
  result = cka.run(kd_workdir, "student_kd", examples=64, out=str(tmp_path))
  assert result["teacher_taps"] == ["stage1", "stage2", "pre_logits", "logits"]  # layer order
  assert result["student_taps"] == ["stage1", "pre_logits", "logits"]
  assert result["examples"] == 64
  with open(tmp_path / "cka_student_kd.json") as f:
    matrix = np.array(json.load(f)["linear_cka"])
  assert matrix.shape == (4, 3) and np.all((matrix >= 0) & (matrix <= 1 + 1e-6))
  assert os.path.getsize(tmp_path / "cka_student_kd.png") > 1000
  assert cka.format_result(result).splitlines()[1].split() == result["student_taps"]


def test_a_workdir_without_the_stage_or_config_fails_with_the_flag(kd_workdir, tmp_path):
  with pytest.raises(ValueError, match=r"--stage: .* 'student_baseline' stage; .* with "
                                       r"checkpoints: student_kd, teacher"):
    cka.run(kd_workdir, "student_baseline")
  with pytest.raises(ValueError, match=r"--workdir=.* holds no config.json"):
    cka.run(str(tmp_path), "student_kd")
