package verity

import (
	"crypto/sha256"
	"encoding/binary"
)

// sha256Init is SHA-256's initial state in the layout blocks2 keeps, for
// two messages: F E B A, then H G D C, twice.
var sha256Init = [16]uint32{
	0x9b05688c, 0x510e527f, 0xbb67ae85, 0x6a09e667, 0x5be0cd19, 0x1f83d9ab, 0xa54ff53a, 0x3c6ef372,
	0x9b05688c, 0x510e527f, 0xbb67ae85, 0x6a09e667, 0x5be0cd19, 0x1f83d9ab, 0xa54ff53a, 0x3c6ef372,
}

// sum256x2 sets d1 to sha256(b1) and d2 to sha256(b2). The two must have
// one length, a multiple of 64 bytes (data blocks always are).
func sum256x2(d1, d2 []byte, b1, b2 []byte) {
	if !haveSum256x2 || len(b1) != len(b2) || len(b1)%64 != 0 {
		s1, s2 := sha256.Sum256(b1), sha256.Sum256(b2)
		copy(d1, s1[:])
		copy(d2, s2[:])
		return
	}
	st := sha256Init
	if len(b1) > 0 {
		blocks2(&st, &b1[0], &b2[0], len(b1)/64)
	}
	// Both messages end with the same padding block: they have one length.
	var pad [64]byte
	pad[0] = 0x80
	binary.BigEndian.PutUint64(pad[56:], uint64(len(b1))*8)
	blocks2(&st, &pad[0], &pad[0], 1)
	putDigest(d1, st[0:8])
	putDigest(d2, st[8:16])
}

// putDigest writes a state in blocks2's layout (F E B A H G D C) as a
// digest (A B C D E F G H, big-endian).
func putDigest(d []byte, s []uint32) {
	for i, w := range [8]uint32{s[3], s[2], s[7], s[6], s[1], s[0], s[5], s[4]} {
		binary.BigEndian.PutUint32(d[4*i:], w)
	}
}
