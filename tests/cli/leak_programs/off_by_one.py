"""Off by one: row i reads keys 0..i+1, one step into the future."""
import attention

attention.main(lambda b, h, i, j: j <= i + 1)
