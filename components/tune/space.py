"""Search spaces as written in a pipeline file, checked before Ray starts.

A space maps ``with:`` keys of the trainable component to one dimension each::

    space:
      lr: {loguniform: [1.0e-4, 1.0e-2]}
      batch_size: {choice: [32, 64]}
      width: {grid: [8, 16]}

``choice`` and ``grid`` values are checked against the trainable's Config one by one, ranges
by their bounds; an unknown key is an error at ``stages.<name>.with.space.<key>``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, ValidationError, create_model, model_validator
from pydantic_core import InitErrorDetails

from components.api import StrictModel

KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


class Dimension(StrictModel):
    """One searched key: exactly one of the fields below.

    Attributes:
        choice: sample one of these values.
        uniform: a float sampled uniformly from ``[lo, hi]``.
        loguniform: a float sampled uniformly in log space from ``[lo, hi]`` (``lo > 0``).
        randint: an int from ``lo`` to ``hi`` (``hi`` excluded, as in Ray Tune).
        grid: every one of these values (each sample of the search runs the whole grid).
    """

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs [lo, hi] with lo < hi (got {list(value)})")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0 (got {value[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def examples(self) -> list[Any]:
        """Values to check against the trainable's Config: every listed one, a range's ends."""
        if self.kind in ("choice", "grid"):
            return list(self.value)
        lo, hi = self.value
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def largest(self) -> Any:
        """The largest value this dimension can take (e.g. for ASHA's epoch budget)."""
        return max(self.examples())

    def to_tune(self):
        """The Ray Tune domain (imports Ray: call only when the search runs)."""
        from ray import tune

        value = self.value
        if self.kind == "choice":
            return tune.choice(value)
        if self.kind == "grid":
            return tune.grid_search(value)
        return getattr(tune, self.kind)(*value)


def check_space(space: Any, config_model: type[StrictModel], fixed: dict[str, Any]) -> Any:
    """Validates a ``space`` mapping against a trainable's Config (called inside a pydantic
    field validator, so errors point at ``space.<key>``).

    Each key must be a field of ``config_model``; each ``choice``/``grid`` value (and each
    range's ends) must validate when merged into ``fixed``.

    Raises:
        pydantic.ValidationError: an unknown key, a malformed dimension or a bad value.
    """
    fields = {name: (Dimension | None, None) for name in config_model.model_fields}
    model = create_model(  # type: ignore[call-overload]
        f"{config_model.__name__}Space",
        __config__=ConfigDict(extra="forbid", frozen=True),
        **fields,
    )
    checked = model.model_validate(space)
    for key in space:
        dim: Dimension = getattr(checked, key)
        for example in dim.examples():
            try:
                config_model.model_validate({**fixed, key: example})
            except ValidationError as e:
                first = e.errors()[0]
                detail = InitErrorDetails(
                    type="value_error",
                    loc=(key, dim.kind),
                    input=example,
                    ctx={"error": ValueError(f"{first['msg']} (value {example!r})")},
                )
                raise ValidationError.from_exception_data(model.__name__, [detail]) from None
    return space
