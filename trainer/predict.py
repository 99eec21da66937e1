"""``--phase predict`` (few-shot classification of your own images) and ``--phase embed`` (their features), the
command line of :class:`models.predict.FewShotPredictor`.

    python main.py --phase predict --eval_weights CKPT --support DIR --query PATH [--out DIR]
    python main.py --phase embed --eval_weights CKPT (--query PATH | --dataset_dir DATA) [--out FILE.npz]

``predict``: the support folder is ``<support>/<class>/<image>`` (the class folders of a dataset split, read with the
same skip rules: hidden files and files that are not images by extension are skipped with one line; an empty class
folder, a subfolder or an image that does not decode is an error naming it); the way is its number of classes. The
query is one image or a folder of images at any depth; when every image is in a class folder named like a support
class (``<query>/<class>/<image>``), the accuracy (with its 95% Wilson interval) and the confusion matrix are
printed and drawn too. The head is ``--eval_classifier`` (``finetune``: the inner loop from the checkpoint's
meta-learned initialisation, ``--test_update_step`` steps, default 100, at ``--base_lr``; ``centroid``: nearest class
mean), the flipped support ``--test_flip_support``, exactly as ``meta_eval`` runs them. Written into ``--out``
(default ``<log_root>/predict/<query name>``), all three or none (``utils.misc.atomic_write_many``):

* ``predictions.csv``: ``path, predicted, probability, prob_<class> ... [, label, correct]``, one row per query in
  path order, the class columns in the support's order (sorted class names);
* ``predictions.json``: the same rows with full-precision probabilities, the model, the head (steps, lr, what it
  started from), the support's classes and counts, the summary, and with labels the accuracy and confusion matrix;
* ``predictions.png``: the contact sheet (``trainer/contact_sheet.py``).

The summary (counts per predicted class, the low-confidence count, the accuracy) is printed before the files are
written; if they cannot be written the run says so and exits 5, as ``meta_eval`` does with its results.

``embed``: the features ``(N, D)`` float32 of ``--query`` (a folder or one image; with class folders also their
labels and class names) or of the three splits of ``--dataset_dir`` (any format the readers read: keys
``<split>_features``, ``<split>_labels``, ``<split>_classes`` and, where the split has file names, ``<split>_paths``),
encoded batched with the model's own preprocessing; ``meta_json`` records the checkpoint and the input.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import torch

from config.options import explicit_flags
from config.settings import PredictSettings, model_flags_from_checkpoint
from data_generator.dataset_loader import load_split, split_spec
from data_generator.folders import IMAGE_EXTENSIONS, class_labels, is_image_name, scan_class_folders, scan_images
from data_generator.reader import SPLITS
from models.bn_mode import batch_dependent
from models.loading import load
from models.predict import LOW_CONFIDENCE, FewShotPredictor, decode_images
from trainer.contact_sheet import QUERY_MAX, png_bytes, render
from utils.errors import UserError
from utils.misc import WriteError, atomic_write, atomic_write_many, remove_orphaned_temporaries, wilson_interval

__all__ = ["prepare", "predict", "embed", "query_files", "query_labels", "SUPPORT_LAYOUT"]

SUPPORT_LAYOUT = "<support>/<class>/<image>"
FILES = ("predictions.csv", "predictions.json", "predictions.png")


# ------------------------------------------------------------------------------------------------ before the header
def prepare(args) -> list[str]:
    """Called by ``main.py`` before the run's header: the flags these phases need, then the model flags from the
    checkpoint's spec as for ``meta_eval`` (:func:`config.settings.model_flags_from_checkpoint`; ``--way`` is neither
    taken nor checked: predict reads the way from ``--support``). Returns the lines to print after the header."""
    phase = args.phase
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UserError(f"--phase {phase} runs in one process (it writes one set of files): run it with python "
                        "main.py, not torchrun")
    if args.eval_weights is None:
        use = "classify with" if phase == "predict" else "encode with"
        raise UserError(f"--phase {phase} needs --eval_weights CKPT, the model to {use} (our pre or meta .pth, the "
                        "official PyTorch .pth, or a TensorFlow weights folder)")
    if phase == "predict":
        for flag, what in (("support", f"DIR, a folder of class folders {SUPPORT_LAYOUT}"),
                           ("query", "PATH, a folder of images or one image")):
            if getattr(args, flag) is None:
                raise UserError(f"--phase predict needs --{flag} {what}")
    given = explicit_flags(args)
    if phase == "embed":
        if args.query is not None and "dataset_dir" in given:
            raise UserError(f"--query {args.query} and --dataset_dir {args.dataset_dir} both name what --phase embed "
                            "encodes; give one of them")
        if args.out is not None and not args.out.lower().endswith(".npz"):
            raise UserError(f"--out {args.out}: --phase embed writes one .npz file; name it so (e.g. --out "
                            f"{os.path.splitext(args.out)[0]}.npz)")
    return model_flags_from_checkpoint(args, skip=frozenset({"way"}))


# ------------------------------------------------------------------------------------------------ the inputs
def query_files(query: str, what: str = "query folder") -> tuple[str, list[str]]:
    """``(root, files)``: one image (its folder and its name) or every image under a folder (relative paths, sorted;
    the skip rules of ``data_generator.folders``). A one-line UserError for a path that is not there, a file that is
    not an image by its extension, or a folder without images."""
    if os.path.isfile(query):
        if not is_image_name(query):
            raise UserError(f"--query {query} is neither a folder nor an image (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        return os.path.dirname(query) or ".", [os.path.basename(query)]
    if not os.path.isdir(query):
        raise UserError(f"--query {query}: no such file or folder")
    files = scan_images(query, what=what)
    if not files:
        raise UserError(f"the {what} {query} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}, at any depth; "
                        "hidden files are skipped)")
    return query, files


def query_labels(files: list[str], classes: list[str]) -> tuple[list[str] | None, str | None]:
    """The true class of each query when the folder is ``<query>/<class>/<image>`` with every ``<class>`` a support
    class; else ``(None, note)``, the note saying why no accuracy is computed (None where nothing suggests labels)."""
    tops = [f.split("/", 1)[0] for f in files]
    deep = [f for f in files if f.count("/") != 1]
    unknown = sorted({t for f, t in zip(files, tops) if "/" in f} - set(classes))
    if not deep and not unknown:
        return tops, None
    if not set(tops) & set(classes):
        return None, None
    why = (f"{len(deep)} image(s) are not directly in a class folder (first: {deep[0]})" if deep else
           f"its folder(s) {', '.join(unknown[:3])} are not support classes")
    return None, f"note: no accuracy: the query folder is not <query>/<class>/<image> with the support's classes: {why}"


# ------------------------------------------------------------------------------------------------ predict
class PredictionsNotWritten(UserError):
    """The summary was computed and printed, but the files could not be written: exit status 5 (as ``meta_eval``'s
    ``ResultsNotWritten``)."""

    exit_code = 5


def _input_note(ps: PredictSettings, model) -> str:
    spec = model.spec
    if spec.image_size is None or spec.preprocess is None:
        return "from the flags: the checkpoint does not record its input"
    if (spec.image_size, spec.preprocess) == (ps.image_size, ps.preprocess):
        return "the checkpoint's"
    return f"as given; the checkpoint was trained on {spec.image_size} px --preprocess {spec.preprocess}"


def predict(ps: PredictSettings, device: torch.device) -> dict:
    """Classify the query images with a head fitted on the support folder; print the summary, then write
    ``predictions.csv``, ``.json`` and ``.png`` into ``ps.out`` (module docstring). Returns the json's content."""
    if os.path.exists(ps.out) and not os.path.isdir(ps.out):
        raise UserError(f"--out {ps.out} is a file; predict writes {', '.join(FILES)} into a folder: pass a folder "
                        "(it is created if it does not exist)")
    files = scan_class_folders(ps.support, layout=SUPPORT_LAYOUT, what="support folder")
    classes, labels = class_labels(files)
    if len(classes) < 2:
        raise UserError(f"the support folder {ps.support} has 1 class folder ({classes[0]}); a few-shot head needs at "
                        f"least 2 classes: add a class folder ({SUPPORT_LAYOUT})")
    root, qfiles = query_files(ps.query)
    truth, note = query_labels(qfiles, classes)
    model = load(ps.weights, device)
    p = FewShotPredictor(model, ps.classifier, ps.steps, ps.lr, ps.inner_loss, ps.flip_support, ps.image_size,
                         ps.preprocess, ps.seed, ps.batch_size, ps.amp, ps.progress)
    counts = np.bincount(labels, minlength=len(classes))
    print(f"model: {ps.weights} ({model.spec.describe()}; {model.source}); input {p.transform.image_size} px "
          f"--preprocess {p.transform.preprocess} ({_input_note(ps, model)})", flush=True)
    print(f"support: {ps.support}: {len(classes)} classes, {len(files)} images ("
          + ", ".join(f"{c} {n}" for c, n in zip(classes, counts)) + ")", flush=True)
    if batch_dependent(model.encoder):
        print(f"note: this model's BatchNorm uses batch statistics at test time (--bn_mode tf): the support is one "
              f"batch, the queries are encoded {ps.batch_size} at a time (--eval_batch_size), and a query's prediction "
              "depends on the queries in its batch", flush=True)
    support_paths = [os.path.join(ps.support, f) for f in files]
    p.fit(support_paths, [classes[i] for i in labels], names=support_paths, source=ps.support)
    print(f"head: {p.describe_head()}", flush=True)
    qpaths = [os.path.join(root, f) if os.path.isdir(ps.query) else ps.query for f in qfiles]
    labelled = " in class folders named like the support's (accuracy below)" if truth is not None else ""
    print(f"query: {ps.query}: {len(qpaths)} image(s){labelled}", flush=True)
    if note:
        print(note, flush=True)
    logits = p.logits(qpaths, names=qpaths, source=ps.query)
    probs = torch.softmax(logits.double(), dim=-1).cpu().numpy()                 # (N, way), rows sum to 1
    pred = logits.argmax(-1).cpu().numpy()                                       # as meta-test scores a query
    result = _result(ps, p, model, classes, counts, qpaths, probs, pred, truth)
    _print_summary(result, classes)
    _write_predictions(ps, p, classes, support_paths, labels, qpaths, result)
    return result


def _result(ps, p, model, classes, counts, qpaths, probs, pred, truth) -> dict:
    way = len(classes)
    rows = []
    for i, path in enumerate(qpaths):
        row = {"path": path, "predicted": classes[pred[i]], "probability": float(probs[i, pred[i]]),
               "probabilities": [float(v) for v in probs[i]]}
        if truth is not None:
            row.update(label=truth[i], correct=bool(truth[i] == classes[pred[i]]))
        rows.append(row)
    summary = {c: int(n) for c, n in zip(classes, np.bincount(pred, minlength=way))}
    result = {"checkpoint": ps.weights, "model": model.spec.describe(), "source": model.source,
              "input": {"image_size": p.transform.image_size, "preprocess": p.transform.preprocess},
              "head": {"classifier": ps.classifier, "steps": ps.steps, "base_lr": ps.lr, "inner_loss": ps.inner_loss,
                       "flip_support": ps.flip_support, "init": p.init_note, "description": p.describe_head()},
              "support": {"folder": ps.support, "classes": classes, "counts": [int(n) for n in counts]},
              "query": {"path": ps.query, "images": len(qpaths), "labelled": truth is not None},
              "summary": summary, "low_confidence_threshold": LOW_CONFIDENCE,
              "low_confidence": int(sum(r["probability"] < LOW_CONFIDENCE for r in rows)),
              "accuracy": None, "confusion": None, "predictions": rows}
    if truth is not None:
        index = {c: k for k, c in enumerate(classes)}
        conf = np.zeros((way, way), dtype=np.int64)
        for t, q in zip(truth, pred):
            conf[index[t], q] += 1
        correct, n = int(np.trace(conf)), len(truth)
        lo, hi = wilson_interval(correct, n)
        result["accuracy"] = {"correct": correct, "total": n, "mean": 100 * correct / n, "ci95_low": 100 * lo,
                              "ci95_high": 100 * hi, "interval": "Wilson score, 95%"}
        result["confusion"] = {"rows": "true class", "columns": "predicted class", "classes": classes,
                               "matrix": conf.tolist()}
    return result


def confusion_text(classes: list[str], matrix: list[list[int]]) -> list[str]:
    """The confusion matrix as text lines: one row per true class, one column per predicted class (numbered as the
    rows; the numbers' names are the row labels)."""
    width = max(len(f"{k}: {c}") for k, c in enumerate(classes))
    cell = max(3, len(str(max(max(r) for r in matrix))), len(str(len(classes) - 1))) + 1
    lines = [" " * (width + 2) + "".join(f"{j:>{cell}}" for j in range(len(classes)))]
    for k, (c, r) in enumerate(zip(classes, matrix)):
        lines.append(f"  {f'{k}: {c}':<{width}}" + "".join(f"{v:>{cell}}" for v in r))
    return lines


def _print_summary(result: dict, classes: list[str]) -> None:
    n = result["query"]["images"]
    counts = ", ".join(f"{c} {k}" for c, k in result["summary"].items())
    print(f"predicted: {counts} ({n} image(s); {result['low_confidence']} with probability < "
          f"{result['low_confidence_threshold']:g})", flush=True)
    acc = result["accuracy"]
    if acc is not None:
        print(f"accuracy: {acc['mean']:.2f}% ({acc['correct']} of {acc['total']}), 95% interval "
              f"{acc['ci95_low']:.2f}-{acc['ci95_high']:.2f} (Wilson)", flush=True)
        print("confusion matrix (rows: true class, columns: predicted class):", flush=True)
        for line in confusion_text(classes, result["confusion"]["matrix"]):
            print(line, flush=True)


def _csv_text(result: dict, classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    labelled = result["accuracy"] is not None
    w.writerow(["path", "predicted", "probability"] + [f"prob_{c}" for c in classes]
               + (["label", "correct"] if labelled else []))
    for r in result["predictions"]:
        w.writerow([r["path"], r["predicted"], f"{r['probability']:.6f}"] + [f"{v:.6f}" for v in r["probabilities"]]
                   + ([r["label"], int(r["correct"])] if labelled else []))
    return buf.getvalue()


def _sheet(p: FewShotPredictor, classes, support_paths, labels, result) -> bytes:
    support_imgs = decode_images(support_paths, p.stored_size)
    support = [support_imgs[labels == k] for k in range(len(classes))]
    rows = result["predictions"][:QUERY_MAX]
    shown = decode_images([r["path"] for r in rows], p.stored_size)
    queries = [{"image": img, "predicted": r["predicted"], "probability": r["probability"], "label": r.get("label")}
               for img, r in zip(shown, rows)]
    conf = np.asarray(result["confusion"]["matrix"]) if result["confusion"] else None
    head = result["head"]["classifier"]
    title = (f"{os.path.basename(result['checkpoint'])} ({result['model']}), head {head}: "
             f"{result['query']['images']} queries")
    if result["accuracy"] is not None:
        title += f", accuracy {result['accuracy']['mean']:.2f}%"
    return png_bytes(render(title, classes, support, queries, result["query"]["images"], conf, LOW_CONFIDENCE))


def _write_predictions(ps, p, classes, support_paths, labels, qpaths, result) -> None:
    csv_text = _csv_text(result, classes)
    json_text = json.dumps(result, indent=1)
    png = _sheet(p, classes, support_paths, labels, result)
    paths = [os.path.join(ps.out, f) for f in FILES]
    if os.path.isdir(ps.out):
        remove_orphaned_temporaries(ps.out)  # those of dead processes only
    try:
        atomic_write_many([(paths[0], lambda f: f.write(csv_text), False),
                           (paths[1], lambda f: f.write(json_text), False),
                           (paths[2], lambda f: f.write(png), True)])
    except WriteError as e:
        raise PredictionsNotWritten(
            f"the predictions could not be written to {e.path}: {e.reason} (the summary above is complete; nothing "
            f"was written; {e.fix} or pass another --out, then run the same command again)") from None
    print(f"predictions written to {os.path.join(ps.out, 'predictions')}.{{csv,json,png}}", flush=True)


# ------------------------------------------------------------------------------------------------ embed
def embed(ps: PredictSettings, device: torch.device) -> dict:
    """Encode ``--query`` or the splits of ``--dataset_dir`` and write the ``.npz`` (module docstring). Returns
    ``{"out": path, "arrays": {key: shape}}``."""
    model = load(ps.weights, device)
    p = FewShotPredictor(model, "centroid", image_size=ps.image_size, preprocess=ps.preprocess,
                         batch_size=ps.batch_size, amp=ps.amp, progress=ps.progress)
    print(f"model: {ps.weights} ({model.spec.describe()}; {model.source}); input {p.transform.image_size} px "
          f"--preprocess {p.transform.preprocess} ({_input_note(ps, model)})", flush=True)
    if batch_dependent(model.encoder):
        print(f"note: this model's BatchNorm uses batch statistics at test time (--bn_mode tf): images are encoded "
              f"{ps.batch_size} at a time (--eval_batch_size), and an image's features depend on its batch", flush=True)
    arrays: dict[str, np.ndarray] = {}
    if ps.query is not None:
        root, files = query_files(ps.query, what="folder")
        paths = [os.path.join(root, f) if os.path.isdir(ps.query) else ps.query for f in files]
        arrays["features"] = p.encode(paths, names=paths, desc="encode", source=ps.query).cpu().numpy()
        arrays["paths"] = np.array(paths)
        if all(f.count("/") == 1 for f in files):  # <folder>/<class>/<image>: class folders
            classes, labels = class_labels(files)
            arrays["labels"], arrays["classes"] = labels, np.array(classes)
        source = ps.query
    else:
        for split in SPLITS:
            imageset = load_split(split_spec(ps.dataset_dir, split, ps.dataset), p.stored_size, ps.cache_dir,
                                  ps.num_workers)
            arrays[f"{split}_features"] = p.encode_set(imageset, desc=f"encode {split}").cpu().numpy()
            arrays[f"{split}_labels"] = np.asarray(imageset.labels, dtype=np.int64)
            arrays[f"{split}_classes"] = np.array(imageset.class_names)
            if imageset.files:
                arrays[f"{split}_paths"] = np.array(imageset.files)
        source = ps.dataset_dir
    meta = {"checkpoint": ps.weights, "model": model.spec.describe(), "source": source,
            "image_size": p.transform.image_size, "preprocess": p.transform.preprocess,
            "features": "float32 (N, D), row i for image i", "dim": model.out_dim}
    arrays["meta_json"] = np.array(json.dumps(meta))
    atomic_write(ps.out, lambda f: np.savez(f, **arrays), binary=True)
    shapes = {k: list(v.shape) for k, v in arrays.items() if k.endswith("features")}
    print(f"features written to {ps.out}: " + ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()), flush=True)
    return {"out": ps.out, "arrays": shapes}

