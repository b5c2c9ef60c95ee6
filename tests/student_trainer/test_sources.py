"""Where records come from (:mod:`student_trainer.sources`), each through the real loaders (``LazySamples`` and
``load_dataset_samples``): the JSONL index, a source in no known format refused when it is opened, missing paths,
and Hub dataset ids read offline from a real ``datasets`` cache (one split, one configuration of several)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest

from student_trainer.config import TrainConfig
from student_trainer.data import load_dataset_samples
from student_trainer.dataset import LazySamples
from student_trainer.sources import JsonlIndex, is_hub_id, open_index
from tests.conftest import REPO, random_image
from tests.student_trainer.test_records import write_jsonl


def test_jsonl_index_finds_every_record_line(tmp_path):
    lines = [json.dumps({"id": i, "text": "é" * i}) for i in range(5)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\n".join(lines[:2]) + "\n\n   \n" + "\n".join(lines[2:])).encode())  # blanks; no final \n
    index = JsonlIndex(path)
    assert len(index) == 5 and [index.record(i)["id"] for i in range(5)] == list(range(5))
    assert index.offsets.dtype == np.int64  # 8 bytes a record (+ 8 for its length)




def test_a_source_in_no_known_format_is_refused_when_opened(tmp_path):
    records = [{"id": str(i), "question": "Q?", "answer": "A"} for i in range(20)]
    records[12] = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}  # too late
    write_jsonl(tmp_path / "qa.jsonl", records)
    datasets.Dataset.from_list(records[:5]).to_parquet(str(tmp_path / "qa.parquet"))
    (tmp_path / "garbage.jsonl").write_text("{not json\n" * 3)
    for name, found in [("qa.jsonl", r"none of its first 8 records.*keys are \['answer', 'id', 'question'\]"),
                        ("qa.parquet", r"its columns are \['id', 'question', 'answer'\]"),
                        ("garbage.jsonl", r"none of its first 3 records.*not valid JSON")]:
        for load in (LazySamples, load_dataset_samples):
            with pytest.raises(ValueError, match=found) as refused:
                load(tmp_path / name)
            assert "LLaVA / ShareGPT" in str(refused.value) and "OpenAI / HF messages" in str(refused.value)
            assert "Data formats" in str(refused.value)


def test_missing_paths_and_hub_ids(tmp_path):
    assert is_hub_id("HuggingFaceH4/llava-instruct-mix-vsft") and is_hub_id("owner/name:validation")
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("/abs/folder") and not is_hub_id("name")
    assert not is_hub_id("./data/x") and not is_hub_id("a/b/c")
    with pytest.raises(ValueError, match="'data/train.jsonl' does not exist"):
        LazySamples("data/train.jsonl")
    student = tmp_path / "student"  # the config checks only that the folder holds a config.json
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="does not exist.*Hub dataset id"):
        TrainConfig(student=str(student), data=str(tmp_path / "nowhere.json"), output=str(tmp_path / "run"),
                    stages="3")
    config = TrainConfig(student=str(student), data="HuggingFaceH4/llava-instruct-mix-vsft",
                         output=str(tmp_path / "run"), stages="3")
    assert config.data == "HuggingFaceH4/llava-instruct-mix-vsft"  # checked when the run opens it




HUB_CHECK = textwrap.dedent("""
    import json, sys
    from student_trainer.data import load_dataset_samples
    from student_trainer.dataset import LazySamples
    lazy = LazySamples("tiny-org/llava_mini")
    samples, _ = load_dataset_samples("tiny-org/llava_mini:validation")
    try:
        LazySamples("tiny-org/not-downloaded")
        refusal = None
    except ValueError as exc:
        refusal = str(exc)
    print(json.dumps({"lazy": [lazy[i].answers for i in range(len(lazy))], "validation": [s.answers for s in samples],
                      "sizes": [im.size for im in lazy[0].images], "refusal": refusal}))
""")


def test_a_hub_id_loads_offline_from_the_datasets_cache(tmp_path, rng, subprocess_env):
    """``owner/name`` with HF_HUB_OFFLINE=1 and a fresh HF_HOME: a set in the cache (laid out as ``load_dataset``
    leaves a downloaded parquet repo: ``owner___name/default/0.0.0/<hash>/name-<split>.arrow``) loads, with
    ``:split``; one not in it is refused with an error saying so."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    photo = random_image(rng, size=20)
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image())})
    for split, answer in (("train", "Noise."), ("validation", "Static.")):
        row = {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                         {"type": "text", "text": "What is it?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
               "images": [photo]}
        datasets.Dataset.from_list([row], features=features).to_parquet(str(tmp_path / f"{split}.parquet"))

    class HubParquet(Parquet):  # the config a Hub parquet repo gets: "default", its data files inside it
        BUILDER_CONFIGS = [ParquetConfig(name="default", data_files=DataFilesDict.from_patterns(
            {"train": ["train.parquet"], "validation": ["validation.parquet"]}, base_path=str(tmp_path)))]

    hf_home = tmp_path / "hf"
    builder = HubParquet(cache_dir=str(hf_home / "datasets"), dataset_name="tiny-org___llava_mini", hash="0" * 16)
    builder.dataset_name = "llava_mini"  # the arrow files are named after the name without its owner
    builder.download_and_prepare()

    env = {**subprocess_env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", HUB_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lazy"] == [["Noise."]] and result["validation"] == [["Static."]]
    assert result["sizes"] == [[20, 20]]
    refusal = result["refusal"]
    assert "'tiny-org/not-downloaded' is not a local path" in refusal
    assert "not in the datasets cache" in refusal and str(hf_home / "datasets") in refusal
    assert "offline (HF_HUB_OFFLINE" in refusal


MULTI_CONFIG_CHECK = textwrap.dedent("""
    import json
    from student_trainer.data import load_dataset_samples
    from student_trainer.dataset import LazySamples
    refusals = {}
    for name, kwargs in {"missing": {}, "unknown": {"config_name": "sizes"},
                         "split": {"split": "test", "config_name": "shapes"}}.items():
        try:
            LazySamples("tiny-org/multi", **kwargs)
        except ValueError as exc:
            refusals[name] = str(exc)
    shapes = LazySamples("tiny-org/multi", config_name="shapes")
    colours, _ = load_dataset_samples("tiny-org/multi:train", config_name="colours")
    print(json.dumps({"shapes": shapes[0].answers, "colours": colours[0].answers, "refusals": refusals}))
""")


def test_a_hub_dataset_of_several_configurations_needs_one_named(tmp_path, subprocess_env):
    """A Hub set of several configurations (as lmms-lab/LLaVA-OneVision-Data) in the offline cache: each loads
    with its name (--data-config); without one, or with one not cached, or with an unknown split, the error says
    which configurations there are and how to pick one."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    configs = []
    for name, answer in (("colours", "Red."), ("shapes", "Circle.")):
        row = {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": answer}]}
        datasets.Dataset.from_list([row]).to_parquet(str(tmp_path / f"{name}.parquet"))
        configs.append(ParquetConfig(name=name, data_files=DataFilesDict.from_patterns(
            {"train": [f"{name}.parquet"]}, base_path=str(tmp_path))))

    class HubParquet(Parquet):
        BUILDER_CONFIGS = configs

    hf_home = tmp_path / "hf"
    for config in configs:
        builder = HubParquet(cache_dir=str(hf_home / "datasets"), config_name=config.name,
                             dataset_name="tiny-org___multi", hash="0" * 16)
        builder.dataset_name = "multi"
        builder.download_and_prepare()

    env = {**subprocess_env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", MULTI_CONFIG_CHECK], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shapes"] == ["Circle."] and result["colours"] == ["Red."]
    refusals = result["refusals"]
    assert set(refusals) == {"missing", "unknown", "split"}
    for refusal in refusals.values():
        assert "Pick the configuration with --data-config NAME" in refusal
    assert "colours" in refusals["missing"] and "shapes" in refusals["missing"]
    assert "'sizes'" in refusals["unknown"] and "['colours', 'shapes']" in refusals["unknown"]
    assert "split 'test'" in refusals["split"] and "['train']" in refusals["split"]


def test_a_dataset_configuration_is_for_hub_ids_only(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    with pytest.raises(ValueError, match="applies to a Hugging Face Hub dataset id only"):
        open_index(data, config_name="shapes")
