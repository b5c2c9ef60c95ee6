"""The paper's alignment check (Fig. 7): do the student's question features stand in for the teacher's?

For N question-answer pairs the Recalibrator runs both paths — the student path ``R([z_qs; z_al])`` (Alg. 1)
and the regularisation path ``R([z_ql; z_al])`` (Alg. 2) — and each sample's answer outputs are mean-pooled.
Entry ``[i, j]`` of the ``(N, N)`` matrix is the cosine similarity of pair i's student-path output with pair j's
regularisation-path output. Once the student is aligned the diagonal stands out: :func:`diagonal_gap` (mean
diagonal minus mean off-diagonal) grows from about 0 towards 1.

**Centring** (default on): before the cosine, each path's pooled outputs have their mean over the N pairs
subtracted. Uncentred, every output shares one large common direction (the Recalibrator's bias, the norm's
scale), so every entry is close to 1 and a real diagonal is hard to see (the demo's uncentred matrix was
0.75-1.0 everywhere, diagonal gap +0.06); centred, the matrix compares what distinguishes one pair from another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from genrecal.distill import regularisation_path_inputs, student_path_inputs
from genrecal.families import LoadedVLM, load_vlm
from genrecal.recalibrator import Recalibrator, alignment_similarity
from genrecal.recalibrator_file import load_recalibrator
from genrecal.resilient_teacher import open_teacher
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures
from student_trainer.align_config import AlignConfig
from student_trainer.data import load_dataset_samples


def run_alignment(config: AlignConfig) -> tuple[float, Path]:
    """``python -m student_trainer align``: load the student, its Recalibrator and the teacher, compute the matrix
    on ``config.limit`` pairs of ``config.data`` and plot it to ``config.output``. Returns (diagonal gap, PNG path);
    the gap is NaN with fewer than 2 pairs."""
    dtype = config.torch_dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples, _ = load_dataset_samples(config.data, image_folder=config.image_folder, limit=config.limit)
    teacher = open_teacher(addr=config.teacher_addr, model=config.teacher_model, device=device, dtype=dtype,
                           timeout_s=config.teacher_timeout_s, retries=config.teacher_retries,
                           token_file=config.teacher_token_file, tls_ca=config.teacher_tls_ca,
                           image_options=config.teacher_image_options)
    student = load_vlm(config.student, dtype=dtype, image_options=config.image_options)
    student.model.to(device)
    # The block count comes from the file's metadata (an older file: from its rec_body keys, with a warning).
    recalibrator = load_recalibrator(config.recalibrator, student.adapter.recalibrator_spec(student.model),
                                     teacher.hidden_size)
    recalibrator.to(device, dtype)
    matrix = alignment_matrix(student, teacher, recalibrator, samples, batch_size=config.batch_size,
                              centre=config.centre)
    gap = diagonal_gap(matrix) if matrix.shape[0] >= 2 else float("nan")
    name = "/".join(Path(os.path.normpath(config.student)).parts[-2:])  # e.g. stage2/student
    title = f"Alignment (paper Fig. 7) of {name}, N={matrix.shape[0]}{', centred' if config.centre else ''}"
    return gap, plot_alignment(matrix, config.output, title=title)


@torch.no_grad()
def alignment_matrix(
    student: LoadedVLM,
    teacher,
    recalibrator: Recalibrator,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    centre: bool = True,
) -> Tensor:
    """``(N, N)`` fp32 cosine similarities, student path (rows) against regularisation path (columns).

    Args:
        student: the student VLM (its body gives ``z_qs``).
        teacher: anything with ``encode(samples) -> list[TeacherFeatures]`` whose features include the question
            features ``z_ql`` (:class:`genrecal.teacher.InProcessTeacher`, or the remote client asked for them).
        recalibrator: the trained Recalibrator.
        samples: the N question-answer pairs (N >= 2 for :func:`diagonal_gap`).
        batch_size: samples per forward pass.
        centre: subtract each path's mean pooled output over the N pairs before the cosine (see above).
    """
    if not samples:
        raise ValueError("alignment_matrix needs at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    student_pooled, regularisation_pooled = [], []
    model = student.model
    with _eval_mode(model, recalibrator):
        for start in range(0, len(samples), batch_size):
            chunk = list(samples[start : start + batch_size])
            features = teacher.encode(chunk)
            _check_question_features(features)
            batch = student.encode(chunk).to(model.device, model.dtype)
            hidden = student.body_hidden_states(batch)  # (B, L_s, D_s)
            student_outputs = recalibrator(student_path_inputs(hidden, batch, features), question_from_teacher=False)
            regularisation_outputs = recalibrator(regularisation_path_inputs(features), question_from_teacher=True)
            student_pooled += [r.float().mean(dim=0) for r in student_outputs]  # each (D_l,)
            regularisation_pooled += [r.float().mean(dim=0) for r in regularisation_outputs]
    student_pooled, regularisation_pooled = torch.stack(student_pooled), torch.stack(regularisation_pooled)  # (N, D_l)
    if centre:
        student_pooled = student_pooled - student_pooled.mean(dim=0, keepdim=True)
        regularisation_pooled = regularisation_pooled - regularisation_pooled.mean(dim=0, keepdim=True)
    return alignment_similarity(student_pooled, regularisation_pooled).cpu()


def diagonal_gap(matrix: Tensor) -> float:
    """Mean of the diagonal minus mean of the off-diagonal entries of a square ``(N, N)`` matrix, N >= 2."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"diagonal_gap needs a square matrix with N >= 2, got shape {tuple(matrix.shape)}")
    matrix = matrix.float()
    n = matrix.shape[0]
    diagonal = matrix.diagonal()
    off_diagonal_mean = (matrix.sum() - diagonal.sum()) / (n * n - n)
    return float(diagonal.mean() - off_diagonal_mean)


def plot_alignment(matrix: Tensor, png_path: str | Path, title: str = "Alignment (paper Fig. 7)") -> Path:
    """Heatmap PNG of an alignment matrix, with the diagonal gap in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = matrix.detach().float().cpu().numpy()
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"plot_alignment needs a square (N, N) matrix, got shape {values.shape}")
    figure = Figure(figsize=(5.5, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=-1.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="cosine similarity")
    subtitle = f"diagonal gap {diagonal_gap(matrix):+.3f}" if values.shape[0] >= 2 else f"N = {values.shape[0]}"
    axes.set_title(f"{title}\n{subtitle}")
    axes.set_xlabel("pair j: Recalib(q_l, a_l)")
    axes.set_ylabel("pair i: Recalib(q_s, a_l)")
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")
    return png_path


def _check_question_features(features: Sequence[TeacherFeatures]) -> None:
    for f in features:
        if len(f.question_segments) != len(f.answer_segments):
            raise ValueError(
                f"teacher features of sample {f.sample_id!r} carry {len(f.question_segments)} question segments "
                f"for {len(f.answer_segments)} answers; the alignment check needs z_ql, so ask the teacher for "
                "question features"
            )


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    """Eval mode (no dropout) for the duration; each module's training flags restored afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.train(training)
