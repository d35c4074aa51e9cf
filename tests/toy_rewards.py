"""Reward functions for the pipeline tests, loaded with --reward toy_rewards:NAME."""
import os


def length(text, row):
    """Varied rewards from any policy, even an untrained one, so that advantages are not all zero."""
    return (len(text) % 7) / 7


def boom(text, row):
    if "1" in row["id"][-1:]:
        raise RuntimeError("reward server unreachable")
    return 0.0


def half_constant(text, row):
    """Equal rewards for every sample of even-numbered rows: dynamic sampling must drop those groups."""
    return 0.5 if int(row["id"][-1]) % 2 == 0 else length(text, row)


def flat_listed_logged(text, row):
    """Equal rewards for the rows in $FLAT_IDS (comma list), else `length`; each scored row's id is
    appended to $REWARD_LOG.<pid>: the prompts each rank rolled out."""
    with open(f"{os.environ['REWARD_LOG']}.{os.getpid()}", "a") as f:
        f.write(row["id"] + "\n")
    return 0.5 if row["id"] in os.environ["FLAT_IDS"].split(",") else length(text, row)


def letter_e(text, row):
    """A reward a random tiny policy climbs within a few GRPO steps: the share of "e" in its text."""
    return text.count("e") / max(len(text), 1)


def constant(text, row):
    """Every sample of every prompt rewarded alike: the groups of a policy too sharp to vary."""
    return 0.5


def colour_side_or_fail(image, row):
    """flow_grpo's colour/side reward, but raising on red prompts and NaN on green ones."""
    import flow_grpo
    if " red " in row["prompt"]:
        raise RuntimeError("reward server unreachable")
    return float("nan") if " green " in row["prompt"] else flow_grpo.colour_side(image, row)
