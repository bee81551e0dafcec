//go:build !amd64 || purego

package verity

const haveSum256x2 = false

func blocks2(*[16]uint32, *byte, *byte, int) { panic("verity: blocks2 without the SHA extensions") }
