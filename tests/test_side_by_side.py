"""The side-by-side benchmark's reading of a trainer's progress bar (benchmarks/side_by_side.py)."""

from benchmarks.side_by_side import elapsed_at_each_step, step_times

# What both trainers write: tqdm redraws the bar with carriage returns, several times per step.
LOG = (
    "caching latents: 100%|██████████| 8/8 [00:09<00:00,  1.2s/it]\n"
    "steps:   0%|          | 0/8 [00:00<?, ?it/s]\r"
    "steps:  12%|█▎        | 1/8 [01:10<08:12, 70.3s/it]\r"
    "steps:  12%|█▎        | 1/8 [01:10<08:12, 70.3s/it, avr_loss=1.08, loss=1.08]\r"
    "steps:  25%|██▌       | 2/8 [01:19<03:57, 39.6s/it, avr_loss=1.09]\r"
    "steps:  50%|█████     | 4/8 [01:37<01:37, 24.3s/it]\r"
    "steps: 100%|██████████| 8/8 [1:02:13<00:00, 18.1s/it]\n"
)


def test_each_step_keeps_the_elapsed_time_of_its_first_redraw():
    assert elapsed_at_each_step(LOG) == {0: 0, 1: 70, 2: 79, 4: 97, 8: 3733}


def test_step_times_are_the_first_step_and_the_mean_of_the_rest():
    first, per_step = step_times(LOG)
    assert first == 70
    assert per_step == (3733 - 70) / 7


def test_a_log_without_a_finished_step_has_no_times():
    assert step_times("steps:   0%|          | 0/8 [00:00<?, ?it/s]") == (None, None)
