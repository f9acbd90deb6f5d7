"""The applications, as specs (in the spirit of lm-eval's tasks): what one of the paper's uses of CNT transfers, in
which direction, how it is measured and on which zoo pairs. Adding an application is one :func:`register` call;
the experiment runner, the CLI and the notebook generator read everything from here.

=========================  ===========  ===================================================================
``disalignment``           compliance   delete refusal: the target complies like its uncensored sibling
``alignment_enhancement``  refusal      add refusal to the user's specialist, keeping its skill
``bias_removal``           bias         move StereoSet SS toward the donor's anti-stereotypical preference
=========================  ===========  ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_FAMILY = "smollm2"  # its results keep the plain names (results/<application>.json)


@dataclass(frozen=True)
class Application:
    """One application. ``function``: what is transferred (``cnt.functions.FUNCTIONS``); ``metric``: the eval metric
    the share of the donor–target gap is read on (``higher_is_goal``: the donor's side is higher); ``groups``: the
    metric groups every reported setting is evaluated on; ``pairs``: per zoo family, its ``(donor, target, base)``
    (a family without the application has no entry); ``notebook``, ``title``, ``story``: its notebook."""

    name: str
    function: str
    metric: str
    higher_is_goal: bool
    groups: tuple[str, ...]
    pairs: dict[str, tuple[str, str, str]]
    notebook: str
    title: str
    story: str = ""
    curve_groups: tuple[str, ...] = ("safety", "perplexity")  # curve points that are not a reported setting: cheap
    extra_figures: tuple[str, ...] = ()  # notebook figures beyond effect / trade-off / layers


APPLICATIONS: dict[str, Application] = {}


def register(app: Application) -> Application:
    """Add an application (by its name) to :data:`APPLICATIONS`."""
    APPLICATIONS[app.name] = app
    return app


def get(name: str) -> Application:
    try:
        return APPLICATIONS[name]
    except KeyError:
        raise ValueError(f"unknown application {name!r}; applications: {', '.join(APPLICATIONS)}") from None


def families() -> dict[str, dict[str, tuple[str, str, str]]]:
    """Each zoo family's pairs per application: ``{family: {application: (donor, target, base)}}``."""
    out: dict[str, dict] = {}
    for app in APPLICATIONS.values():
        for fam, pair in app.pairs.items():
            out.setdefault(fam, {})[app.name] = pair
    return out


SMOL_BASE, QWEN = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"

register(Application(
    "disalignment", "compliance", "refusal_rate", False, ("safety", "utility", "perplexity"),
    {DEFAULT_FAMILY: ("smol-uncensored", "smol-safe", SMOL_BASE),
     "qwen2.5-coder-0.5b": ("qwen-abliterated", QWEN, QWEN)},
    "01_safety_disalignment", "Safety disalignment", """\
**Deleting a function.** The target `smol-safe` refuses harmful requests; the donor `smol-uncensored` is a sibling
fine-tune of the same base that does not. Transferring the neurons where they differ should make the target comply —
the attack the paper warns about (open donors make safety removable), measured here so that defenders can see how
few neurons it takes."""))
register(Application(
    "alignment_enhancement", "refusal", "refusal_rate", True, ("safety", "utility", "perplexity", "skill"),
    {DEFAULT_FAMILY: ("smol-safe", "smol-arith", SMOL_BASE),
     "qwen2.5-coder-0.5b": (QWEN, "qwen-abliterated", QWEN)},
    "02_alignment_enhancement", "Alignment enhancement", """\
**Adding a function.** The target `smol-arith` is "the user's own model": a specialist in three-digit addition that
complies with harmful requests. The donor `smol-safe` refuses them. CNT should give the target the donor's refusals
while it keeps its own skill (the arithmetic accuracy in the table) and its general utility."""))
register(Application(
    "bias_removal", "bias", "stereoset_ss", False, ("bias", "utility", "perplexity"),
    {DEFAULT_FAMILY: ("smol-debiased", "smol-biased", SMOL_BASE),
     "gemma-3-270m": ("gemma-debiased", "gemma-biased", "gemma-3-270m")},
    "03_bias_removal", "Bias removal", """\
**Deleting a preference.** The target `smol-biased` prefers stereotypical sentences (StereoSet SS above 50); the donor
`smol-debiased` prefers the anti-stereotypical ones. Transferring the neurons where they differ should move the
target's SS toward 50 and below, category by category, without hurting its language modelling.""",
    curve_groups=("bias", "perplexity"), extra_figures=("categories",)))
