"""Data pipeline: tokenizers, one-time preparation to a token file, step-addressed batches."""
from .dataset import TokenDataset
from .index import PreparedDatasetError, read_index, verify_dataset
from .prepare import prepare_dataset
from .sources import DataSourceError
from .tokenizer import BYTE_EOS_ID, BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["TokenDataset", "PreparedDatasetError", "read_index", "verify_dataset",
           "prepare_dataset", "DataSourceError", "BYTE_EOS_ID", "BYTE_VOCAB_SIZE",
           "ByteTokenizer", "HFTokenizer", "load_tokenizer"]
