"""`abliterate search`'s options, declared once (abliterate.options.declared): its click options, the study's
settings (`settings`, the fields of search.study.SearchSettings that come from the command line) and the
command its recipe records all come from SearchOptions."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import click

from abliterate.options.declared import group, option
from abliterate.options.families import ModelOptions, batch_size_option
from abliterate.options.recipe import KL_OBJECTIVES, REFUSAL_OBJECTIVES


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """The search command's options; the defaults are search.study.SearchSettings' (a test holds them equal)."""

    model: str = option(help="", default=MISSING)
    direction_path: Path = option("--direction", required=True, type=click.Path(path_type=Path), default=None,
                                  help="Direction file written by `abliterate extract` (its candidates are what is "
                                  "searched).")
    out: Path = option("--out", required=True, type=click.Path(path_type=Path), default=None,
                       help="Recipe YAML to write for the chosen point (its direction file goes beside it).")
    study_path: Path | None = option("--study", type=click.Path(path_type=Path), help="SQLite file holding the "
                                     "study; rerun with it to resume. Default: OUT's name + .study.db.")
    study_name: str = option("--study-name", default="abliterate-search", show_default=True,
                             help="The study's name inside the --study file.")
    trials: int = option("--trials", default=100, show_default=True,
                         help="Completed trials the study should have; a rerun with more continues it.")
    time_budget: float | None = option("--time-budget", type=float, help="Seconds: start no new trial after this "
                                       "long (whichever of --trials and this comes first).")
    max_kl: float | None = option("--max-kl", type=float, help="Choose the fewest refusals with KL at most this.")
    max_refusals: float | None = option("--max-refusals", type=float, help="Choose the lowest KL with at most this "
                                        "fraction of prompts refused (0.05: 5 %).")
    seed: int = option("--seed", default=0, show_default=True, help="Seed of the sampler (its random and TPE "
                       "trials).")
    startup_trials: int = option("--startup-trials", default=10, show_default=True,
                                 help="Random trials before TPE takes over.")
    max_strength: float = option("--max-strength", default=1.5, show_default=True,
                                 help="Upper bound of every strength (>= 1).")
    norm_preserve: bool = option("--norm-preserve/--no-norm-preserve", default=True, show_default=True,
                                 help="Search norm-preserving edits too (each written vector keeps its norm; `apply "
                                 "--norm-preserve`).")
    from_random: bool = option("--from-random", is_flag=True,
                               help="Do not start from the extraction's choice (fully removed) and the seed points "
                               "beside it.")
    harmful: str = option("--harmful", default="builtin:harmful", show_default=True, help="Harmful prompts "
                          "(built-in sets: their validation split), a file or hf:OWNER/NAME.")
    harmless: str = option("--harmless", default="builtin:harmless", show_default=True,
                           help="Harmless prompts, same forms.")
    overrefusal: str = option("--overrefusal", default="builtin:overrefusal", show_default=True,
                              help="Borderline prompts (safe but dangerous-looking) whose refusals points on the "
                              "front also count, a third objective; 'none' skips it. The built-in set's prompts that "
                              "`evaluate` reports on are left out.")
    field: str | None = option("--field", help="Column/field holding the prompt in structured files or datasets.")
    n_val: int = option("--n-val", default=32, show_default=True, help="Validation prompts per set.")
    max_new_tokens: int = option("--max-new-tokens", default=24, show_default=True,
                                 help="Greedy tokens per reply when counting refusals of points on the front.")
    kl_objective: str = option("--kl-objective", type=click.Choice(KL_OBJECTIVES), default="first-token",
                               show_default=True, help="KL at the first reply token (fast), or averaged over the "
                               "first --kl-tokens tokens of the unedited model's own reply, teacher-forced (sees "
                               "damage after the first token).")
    kl_tokens: int = option("--kl-tokens", default=16, show_default=True,
                            help="Reply tokens in --kl-objective continuation.")
    refusal_objective: str = option("--refusal-objective", type=click.Choice(REFUSAL_OBJECTIVES), default="score",
                                    show_default=True, help="First-token refusal log-odds (fast), or the number of "
                                    "greedy replies of --max-new-tokens the refusal markers count, generated every "
                                    "trial (sees refusals after a preamble).")
    batch_size: int = batch_size_option(16)
    model_options: ModelOptions = group(ModelOptions)
    quiet: bool = option("--quiet", "-q", is_flag=True, record="never", help="No progress bars.")

    def settings(self) -> dict[str, Any]:
        """search.study.SearchSettings' fields as given here (its template is loaded from --template by the
        caller: loading reads a file)."""
        return {"trials": self.trials, "seed": self.seed, "startup_trials": self.startup_trials,
                "max_strength": self.max_strength, "batch_size": self.batch_size,
                "max_new_tokens": self.max_new_tokens, "start_from_selected": not self.from_random,
                "thinking": self.model_options.thinking, "kl_objective": self.kl_objective,
                "kl_tokens": self.kl_tokens, "refusal_objective": self.refusal_objective,
                "time_budget": self.time_budget, "norm_preserve": self.norm_preserve}
