"""Training data: files -> validated conversations -> token ids + loss masks -> batches.

    report = validate_file(path, tokenizer=None, max_seq_len=512, batch_size=8, tokens_per_second=None)
    convs = read_conversations(path)                     # raises DataError if the file has errors
    ex = encode_conversation(tokenizer, conv, max_seq_len)
    examples = encode_conversations(tokenizer, convs, max_seq_len)   # fast, many at once
    train, valid = split_train_valid(convs, val_split, seed)
    batches = make_batches(examples, batch_size, seed, epoch, pad_id=0)
"""
from .batching import batch_order, make_batches, padded_tokens, split_train_valid
from .encode import encode_conversation, template_messages
from .stream import encode_conversations
from .report import DataError, ValidationReport
from .types import IGNORE_INDEX, ROLES, Batch, Conversation, EncodedExample, Issue, Message
from .validate import read_conversations, validate_file

__all__ = ["DataError", "Issue", "ValidationReport", "Conversation", "Message", "read_conversations",
           "validate_file", "encode_conversation", "encode_conversations", "EncodedExample", "make_batches",
           "Batch", "split_train_valid", "batch_order", "padded_tokens", "template_messages", "IGNORE_INDEX",
           "ROLES"]
