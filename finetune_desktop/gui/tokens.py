"""Tokens as a person can read them, and their losses as colours. No Qt here (workers call it).

A byte-level tokenizer often splits one Korean syllable (three UTF-8 bytes) over two or three
tokens; decoded alone, each piece is an unreadable replacement character. `display_pieces`
decodes the growing prefix instead (as the chat's stream decoder does): a token that completes a
character shows the whole character, the tokens before it show PART_MARK and say so on hover."""
from __future__ import annotations

import math
from dataclasses import dataclass

PART_MARK = "\u25e6"          # ◦ : this token is the first bytes of a character the next token completes
LOSS_SCALE_MAX = 6.0          # nats at which the colour is fully red (a loss of e^6 ≈ 1 in 400)


@dataclass(frozen=True)
class Piece:
    text: str                 # what the chip shows
    kind: str                 # "text", "part" (bytes of a character finished later) or "special"
    raw: str                  # the token alone, decoded (may be a replacement character)


@dataclass(frozen=True)
class TokenPicture:
    """One example under one model: the pieces and the engine's numbers (training.inspect)."""
    pieces: tuple[Piece, ...]
    losses: tuple                # per token: loss or None (does not count toward the loss)
    probs: tuple                 # per token: p(token | before) or None
    top: tuple                   # per token: ((text, p), ...) the model's top guesses
    mean_loss: float
    label: str                   # which model


def display_pieces(tokenizer, ids) -> list[Piece]:
    ids = [int(i) for i in ids]
    out: list[Piece] = []
    emitted = ""
    pending: list[int] = []          # indexes of tokens waiting for their character to complete
    for i in range(len(ids)):
        raw = tokenizer.decode([ids[i]])
        special = raw != "" and tokenizer.decode([ids[i]], skip_special_tokens=True) == ""
        text = tokenizer.decode(ids[: i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids) and not special:
            pending.append(i)
            out.append(Piece(PART_MARK, "part", raw))
            continue
        piece = text[len(emitted):] if text.startswith(emitted) else raw
        emitted = text
        pending.clear()
        out.append(Piece(piece, "special" if special else "text", raw))
    return out


def shown_text(piece: Piece) -> str:
    """A chip's label: line breaks and tabs made visible, spaces kept."""
    t = piece.text.replace("\r", "")
    return t.replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def loss_rgb(loss) -> tuple[int, int, int]:
    """Light green (0 nats) through yellow to red (LOSS_SCALE_MAX and above); grey when None."""
    if loss is None or (isinstance(loss, float) and math.isnan(loss)):
        return (225, 228, 232)
    x = max(0.0, min(1.0, float(loss) / LOSS_SCALE_MAX))
    stops = [(0.0, (214, 240, 214)), (0.35, (255, 236, 150)), (0.7, (245, 150, 90)), (1.0, (205, 45, 45))]
    for (x0, c0), (x1, c1) in zip(stops, stops[1:]):
        if x <= x1:
            f = (x - x0) / (x1 - x0)
            return tuple(int(round(a + f * (b - a))) for a, b in zip(c0, c1))
    return stops[-1][1]


def describe(picture: TokenPicture | None, i: int, loss=None, counted: bool | None = None) -> str:
    """The hover text of token i: its text, loss, probability and the model's top guesses."""
    if picture is not None:
        p = picture.pieces[i]
        loss, prob, top = picture.losses[i], picture.probs[i], picture.top[i]
    else:
        p, prob, top = None, None, ()
    lines = []
    if p is not None:
        lines.append(f"token {i}: {p.raw!r}" + (" (a piece of a character: its bytes continue in the next token)"
                                                if p.kind == "part" else ""))
    if loss is not None and loss == loss:
        lines.append(f"loss {float(loss):.3f} nats")
    elif counted is False or (picture is not None and i > 0):
        lines.append("does not count toward the loss (not part of a trained reply)")
    if prob is not None:
        lines.append(f"probability {prob:.1%}")
    if top:
        lines.append("top guesses: " + ", ".join(f"{t!r} {q:.1%}" for t, q in top))
    return "\n".join(lines) or f"token {i}"
