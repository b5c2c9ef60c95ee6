"""Does a student know the answer before its head names it? A diagnostic for the distillation benchmark.

For each model and question type, the student's body state at the position that predicts the first answer token
(its last question position: the state its head reads, and the one GenRecal's L1 reaches it through) is taken for
``--train-per-type`` distillation questions (their clean answers) and for the balanced test's questions. A linear
probe (multinomial logistic regression on standardised states) is fitted on the first and scored on the second,
beside the head's own accuracy on that first answer token. A probe far above the head means the knowledge is in
the body's features and the deficit is the head's read-out, which GenRecal's stage 2 does not train.

    # OUT/ is benchmarks/distillation.py's --out; any number of student checkpoints (base, after stage 2, ...)
    python benchmarks/answer_probe.py --data OUT/data --models OUT/models/student/model runs/genrecal/final
    # the reference: the same vision encoder and projector under a freshly initialised language model and head
    python benchmarks/answer_probe.py --data OUT/data --models OUT/models/student/model --random-language-model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from demo.splits import without_label_noise
from genrecal.families import load_vlm
from student_trainer.records import record_to_sample

MICRO_BATCH = 16


def clean_records(path: Path, kind: str, limit: int | None) -> list[dict]:
    """The ``kind`` records of a benchmark JSON file with their clean answers restored, at most ``limit``."""
    return without_label_noise([r for r in json.loads(path.read_text()) if r.get("type") == kind][:limit])


@torch.no_grad()
def first_answer_states(vlm, records: list[dict], root: Path) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(N, D) body states at each sample's first answer prediction position, the N answers, and (N,) bool: the
    head's argmax there is the first answer token."""
    states, right = [], []
    for start in range(0, len(records), MICRO_BATCH):
        samples = [record_to_sample(r, start + i, root) for i, r in enumerate(records[start:start + MICRO_BATCH])]
        batch = vlm.encode(samples)
        hidden = vlm.body_hidden_states(batch)  # (B, L, D)
        for i in range(len(samples)):
            position = int(batch.prediction_positions(i)[0])
            states.append(hidden[i, position].float())
            right.append(bool(vlm.head(hidden[i, position]).argmax() == batch.answer_token_ids(i)[0]))
    answers = [r["conversations"][-1]["value"] for r in records]
    return torch.stack(states), answers, torch.tensor(right)


def linear_probe(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str],
                 steps: int = 500) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted on (train_x, train_y), full batch, Adam."""
    classes = {c: i for i, c in enumerate(sorted(set(train_y) | set(test_y)))}
    a, b = (torch.tensor([classes[y] for y in ys]) for ys in (train_y, test_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], len(classes))
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_x), a).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(test_x).argmax(1) == b).float().mean())


def with_random_language_model(vlm, seed: int = 0):
    """The same VLM with its body and head re-initialised (the family's own init), its trained vision encoder and
    projector kept: what a language model that learnt nothing makes of what the vision tower sees."""
    torch.manual_seed(seed)
    fresh = type(vlm.model)._from_config(vlm.model.config)
    groups = vlm.adapter.parameter_groups(vlm.model)
    kept = {id(p) for group in ("vision_encoder", "projector") for p in groups[group]}
    trained = vlm.model.state_dict()
    state = fresh.state_dict()
    for name, param in vlm.model.named_parameters():
        if id(param) in kept:
            state[name] = trained[name]
    fresh.load_state_dict(state)
    return dataclasses.replace(vlm, model=fresh)


def probe_model(model: Path, data: Path, kinds: list[str], train_per_type: int,
                random_language_model: bool = False) -> dict[str, dict[str, float]]:
    """kind -> {"head": the head's first-token accuracy on the test questions, "probe": the probe's}."""
    vlm = load_vlm(model)
    if random_language_model:
        vlm = with_random_language_model(vlm)
    vlm.model.eval()
    out = {}
    for kind in kinds:
        train_x, train_y, _ = first_answer_states(vlm, clean_records(data / "train_distill.json", kind, train_per_type), data)
        test_x, test_y, head_right = first_answer_states(vlm, clean_records(data / "test_balanced.json", kind, None), data)
        out[kind] = {"head": float(head_right.float().mean()), "probe": linear_probe(train_x, train_y, test_x, test_y),
                     "test_questions": len(test_y)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="the benchmark's data folder (train_distill.json, test_balanced.json, images/)")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="student checkpoint folders")
    parser.add_argument("--types", default="colour,shape", help="question types, comma-separated (default colour,shape)")
    parser.add_argument("--train-per-type", type=int, default=600, help="distillation questions the probe is fitted on")
    parser.add_argument("--random-language-model", action="store_true",
                        help="re-initialise each model's body and head first (vision encoder and projector kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kinds = args.types.split(",")
    print(f"{'model':<48} {'type':<7} {'head':>6} {'probe':>6} {'n':>5}")
    for model in args.models:
        rows = probe_model(model, args.data, kinds, args.train_per_type, args.random_language_model)
        for kind, row in rows.items():
            print(f"{str(model)[-48:]:<48} {kind:<7} {row['head']:6.1%} {row['probe']:6.1%} {row['test_questions']:5d}",
                  flush=True)


if __name__ == "__main__":
    main()
