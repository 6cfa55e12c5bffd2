"""The synthetic image task of the zoo's toy VLM (`zoo:shapes-llava`).

A 32×32 RGB image holds one filled shape (square, cross or bar) of one colour in one quadrant.
Questions (word-level text; "<image>" is the processor's image placeholder):

    color     "<image> question : what color is the shape ? answer :"        -> "red"
    shape     "<image> question : what shape is it ? answer :"               -> "cross"
    where     "<image> question : where is the shape ? answer :"             -> "top left"
    object    "<image> question : what color is the banana ? answer :"       -> the colour in the image
    pope      "<image> question : is the shape red ? answer :"               -> "yes" / "no"
    prior     "question : what color is the banana ? answer :"  (no image)   -> the object's usual colour

Objects have a usual colour (banana yellow, leaf green, sky blue, apple red). In training, an
object's image shows its usual colour with probability `prior` (0.9), so the text prior and the
image agree most of the time; the *conflict* split shows another colour, where a model that leans
on the prior answers the usual colour instead of what it sees (language-prior hallucination).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "cross", "bar")
WHERE = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
OBJECTS = {"banana": "yellow", "leaf": "green", "sky": "blue", "apple": "red"}
KINDS = ("color", "shape", "where", "object", "pope", "prior")
IMAGE_KINDS = ("color", "shape", "where", "object", "pope")
SIZE = 32
FAINT_STRENGTH, FAINT_NOISE = 0.2, 25.0


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    where: str
    faint: bool = False
    """Objects are drawn faint (20% colour over grey, heavy noise): the image is weak evidence, so a
    model weighs it against the object's usual colour — where language-prior hallucination lives."""

    def draw(self, rng: random.Random | None = None) -> torch.Tensor:
        """[3, 32, 32] uint8 image: grey background with noise, the shape in its quadrant."""
        rng = rng or random.Random(0)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        noise = FAINT_NOISE if self.faint else 6.0
        img = torch.full((3, SIZE, SIZE), 128.0)
        row, col = WHERE[self.where]
        y0, x0 = row * 16 + rng.randint(1, 4), col * 16 + rng.randint(1, 4)
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        if self.shape == "square":
            mask[y0:y0 + 10, x0:x0 + 10] = True
        elif self.shape == "cross":
            mask[y0 + 4:y0 + 6, x0:x0 + 10] = True
            mask[y0:y0 + 10, x0 + 4:x0 + 6] = True
        elif self.shape == "bar":
            mask[y0 + 3:y0 + 7, x0:x0 + 11] = True
        # "none": the background only (a blank image, for answers without seeing the shape)
        strength = FAINT_STRENGTH if self.faint else 1.0
        for c, v in enumerate(COLORS[self.color]):
            img[c][mask] = 128.0 + strength * (float(v) - 128.0)
        img = img + torch.randn(3, SIZE, SIZE, generator=g) * noise
        return img.clamp(0, 255).to(torch.uint8)


    def array(self, rng: random.Random | None = None) -> Any:
        """The drawn image as an HxWx3 uint8 numpy array (what image processors and PIL take)."""
        return self.draw(rng).permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class Example:
    kind: str
    prompt: str
    answer: str
    scene: Scene | None
    conflict: bool = False
    """True for an object question whose image contradicts the object's usual colour."""

    @property
    def needs_image(self) -> bool:
        return self.kind in IMAGE_KINDS


def vocabulary() -> list[str]:
    words = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>", "question", ":", "answer", "?", "what", "color", "is",
             "the", "shape", "it", "where", "yes", "no", "top", "bottom", "left", "right"]
    words += list(COLORS) + list(SHAPES) + list(OBJECTS)
    return list(dict.fromkeys(words))


def example(rng: random.Random, kind: str, prior: float = 0.9, conflict: bool | None = None) -> Example:
    """One example of `kind`. For "object", `conflict` forces (True) or forbids (False) an image whose
    colour differs from the object's usual one; None draws it with probability 1 − prior."""
    scene = Scene(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(WHERE)))
    if kind == "color":
        return Example(kind, "<image> question : what color is the shape ? answer :", scene.color, scene)
    if kind == "shape":
        return Example(kind, "<image> question : what shape is it ? answer :", scene.shape, scene)
    if kind == "where":
        return Example(kind, "<image> question : where is the shape ? answer :", scene.where, scene)
    if kind == "pope":
        asked = rng.choice(list(COLORS))
        return Example(kind, f"<image> question : is the shape {asked} ? answer :", "yes" if asked == scene.color else "no", scene)
    obj = rng.choice(list(OBJECTS))
    usual = OBJECTS[obj]
    if kind == "prior":
        return Example(kind, f"question : what color is the {obj} ? answer :", usual, None)
    if kind != "object":
        raise ValueError(f"unknown kind {kind!r}; kinds: {KINDS}")
    clash = (rng.random() > prior) if conflict is None else conflict
    color = rng.choice([c for c in COLORS if c != usual]) if clash else usual
    scene = Scene(color, scene.shape, scene.where, faint=True)
    return Example(kind, f"<image> question : what color is the {obj} ? answer :", color, scene, conflict=clash)


def held_out(kind: str, n: int, seed: int = 70_000, conflict: bool | None = None) -> list[Example]:
    """A seeded evaluation set (seeds apart from training's)."""
    rng = random.Random(seed + KINDS.index(kind))
    return [example(rng, kind, conflict=conflict) for _ in range(n)]
