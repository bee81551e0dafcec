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

// pairable says whether sum256x2 hashes blocks of blockSize bytes with
// this salt on the fast path.
func pairable(salt []byte, blockSize int) bool {
	return haveSum256x2 && len(salt) < 64 && blockSize >= 64
}

// sum256x2 sets d1 to sha256(salt ‖ b1) and d2 to sha256(salt ‖ b2), for
// b1 and b2 of one length. With the SHA extensions, a salt under 64 bytes
// and at least 64 bytes of data, it hashes both at once (blocks2);
// otherwise one after the other with crypto/sha256.
func sum256x2(d1, d2 []byte, salt, b1, b2 []byte) {
	if !pairable(salt, len(b1)) || len(b1) != len(b2) {
		for _, m := range [2]struct{ d, b []byte }{{d1, b1}, {d2, b2}} {
			h := sha256.New()
			h.Write(salt)
			h.Write(m.b)
			h.Sum(m.d[:0])
		}
		return
	}
	st := sha256Init
	var t1, t2 [128]byte // blocks that mix salt, data and padding
	off := 0             // data bytes hashed
	if len(salt) > 0 {
		// The first block: the salt, then the start of the data.
		off = copy(t1[copy(t1[:], salt):64], b1)
		copy(t2[copy(t2[:], salt):64], b2)
		blocks2(&st, &t1[0], &t2[0], 1)
	}
	if full := (len(b1) - off) / 64; full > 0 {
		blocks2(&st, &b1[off], &b2[off], full)
		off += 64 * full
	}
	// The rest of the data, 0x80, zeros and the length in bits: one block,
	// or two when fewer than 9 bytes are free after the data.
	tail := copy(t1[:], b1[off:])
	copy(t2[:], b2[off:])
	n := 64
	if tail+9 > 64 {
		n = 128
	}
	for _, t := range []*[128]byte{&t1, &t2} {
		t[tail] = 0x80
		clear(t[tail+1 : n-8])
		binary.BigEndian.PutUint64(t[n-8:n], uint64(len(salt)+len(b1))*8)
	}
	blocks2(&st, &t1[0], &t2[0], n/64)
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
