"""Run heretic (heretic-llm 1.4) without a terminal: its menus answered by a fixed rule, its choice saved.

Run with the Python of heretic's own virtual environment, from a folder holding heretic's config.toml:

    VENV/bin/python benchmarks/heretic_driver.py OUT_FOLDER CHOICE_JSON [heretic's own options ...]

Heretic optimises, then asks in menus which trial of its front to keep and what to do with it. Here the
trial is the first one heretic lists (its front sorted by refusals, then KL: the fewest refusals on its
evaluation prompts, as a user aiming at an uncensored model picks), merged into full weights and saved to
OUT_FOLDER; the front and the choice go to CHOICE_JSON. Any other question is an error (never a hang).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    out, record = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    import heretic.main as hm

    state: dict = {"saved": False, "front": None, "chosen": None}

    def select(message: str, choices: list):
        if message.startswith("Which trial"):
            if state["saved"]:
                return ""
            front = [c.value for c in choices if not isinstance(c.value, str)]
            state["front"] = [{"index": t.user_attrs["index"], "refusals": t.user_attrs["refusals"],
                               "kl": t.user_attrs["kl_divergence"]} for t in front]
            state["chosen"] = state["front"][0]
            return front[0]
        if message.startswith("What do you want to do"):
            if state["saved"]:
                return ""
            state["saved"] = True
            return "Save the model to a local folder"
        if message.startswith("How would you like to proceed"):
            return "restart"
        raise SystemExit(f"heretic asked an unexpected question: {message!r}")

    def refuse(message: str, *_args):
        raise SystemExit(f"heretic asked an unexpected question: {message!r}")

    hm.prompt_select = select
    hm.prompt_path = lambda _message: out
    hm.prompt_text = refuse
    hm.prompt_password = refuse
    hm.run()
    if not state["saved"]:
        raise SystemExit("heretic finished without saving a model")
    with open(record, "w") as f:
        json.dump({"front": state["front"], "chosen": state["chosen"]}, f, indent=1)


if __name__ == "__main__":
    main()
