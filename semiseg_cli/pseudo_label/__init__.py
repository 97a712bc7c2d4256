"""`semiseg pseudo-label`: dump a checkpoint's pseudo-labels, confidence and entropy for a split.

For every image of a split (a split file or a split name of the checkpoint's dataset) the
inference network (the EMA teacher when the checkpoint has one) predicts class probabilities,
optionally averaged over test-time scales and flips, and the command writes, mirroring the
image's root-relative path with the extension changed:

    DIR/labels/NAME.png       palette PNG, value = class id, 255 = unreliable (when thresholded)
    DIR/confidence/NAME.png   16-bit grey, max softmax probability x 65535   (or .npz, float16)
    DIR/entropy/NAME.png      16-bit grey, entropy / ln(C) x 65535           (or .npz, float16)
    DIR/overlays/NAME.jpg     the image with the labels blended in (--overlays)
    DIR/train_labels/NAME.png the labels in the dataset's stored encoding, where it is not class ids
    DIR/records/NAME.json     the per-image record, written last: its presence marks the image done
    DIR/manifest.jsonl        one record per image of the split, rebuilt from records/ every run
    DIR/split.txt             "image label" lines usable as `semiseg train --labeled-list`
    DIR/summary.json          per-class pixel share, confidence, reliable fraction, accuracy
    DIR/meta.json             checkpoint identity, settings and how to decode the files

One job per module: `runner` (settings, the run, one batch), `dataset` (which images, read for
the network), `quantise` (every per-pixel output of a batch, on the device), `stats`
(reliability, counts, records' numbers, summary), `writer` (encoding one image's files, the
writer front), `pool` (the bounded pool of writer processes and its shared memory), `folder`
(names, identity, resume, manifest). The checkpoint-and-split
preamble it shares with `eval` is `semiseg_cli.engine.inputs`.

Nothing here imports torch or numpy at import time: `semiseg --help` should not load them.
"""

from semiseg_cli.pseudo_label.dataset import PseudoLabelDataset, collate, resolve_pairs
from semiseg_cli.pseudo_label.folder import (
    IGNORE,
    META_FORMAT,
    OWNED,
    U16,
    PseudoLabelCheckFailed,
    output_stem,
    prepare_out_dir,
    weights_digest,
)
from semiseg_cli.pseudo_label.runner import PseudoLabelResult, PseudoLabelSettings, run_pseudo_label
from semiseg_cli.pseudo_label.stats import batch_counts, normalised_entropy, print_summary, reliable_mask, summarise

__all__ = [
    "IGNORE", "META_FORMAT", "OWNED", "U16", "PseudoLabelCheckFailed", "PseudoLabelDataset", "PseudoLabelResult",
    "PseudoLabelSettings", "batch_counts", "collate", "normalised_entropy", "output_stem", "prepare_out_dir",
    "print_summary", "reliable_mask", "resolve_pairs", "run_pseudo_label", "summarise", "weights_digest",
]
