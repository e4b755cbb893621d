"""Never reads its own key: row i reads keys 0..i-1. Not a leak, but row 0
reads nothing (zeros) and row 1 reads key 0 alone (weight 1 whatever q1 is),
so neither changes with its own position: allowed dependencies that are
never observed, which the checker reports as warnings."""
import attention

attention.main(lambda b, h, i, j: j < i)
