"""The functions of the local lmms-eval task ``genrecal_vqa`` (see ``genrecal_vqa.yaml``)."""

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    # Scored in the task itself: lmms-eval's built-in exact_match goes through the `evaluate` library, which
    # fetches the metric from the Hub.
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"].strip().lower().rstrip("."))}
