package gzran

// Huffman decoding tables. A table maps the next tableBits bits of input
// (DEFLATE sends codes most significant bit first into an LSB-first bit
// stream, so codes are stored bit-reversed) to an entry; codes longer than
// tableBits go through a second-level subtable that the primary entry
// points at, as zlib's inflate does.
//
// An entry is a uint32:
//
//	bits  0..3   code length to consume (subtable pointers: unused)
//	bits  4..7   extra bits that follow the symbol (pointers: subtable bits)
//	bits  8..23  value: literal byte, length or distance base, subtable start
//	bits 24..27  kind
const (
	kindLiteral = 0 // also every distance symbol
	kindLength  = 1
	kindEOB     = 2
	kindSub     = 3
	kindInvalid = 4
)

const (
	litTableBits  = 10
	distTableBits = 8
	clTableBits   = 7
)

func entry(kind, value, extra uint32) uint32 { return kind<<24 | value<<8 | extra<<4 }

var (
	lengthBase  = [29]uint32{3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258}
	lengthExtra = [29]uint32{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0}
	distBase    = [30]uint32{1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577}
	distExtra   = [30]uint32{0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13}

	// Entries (without code length) of every symbol of each alphabet.
	// Symbols 286 and 287 (lengths) and 30 and 31 (distances) can appear
	// in the fixed code but are invalid, as compress/flate treats them.
	litSyms  [288]uint32
	distSyms [32]uint32
	clSyms   [19]uint32

	fixedLit, fixedDist []uint32
)

func init() {
	for s := range litSyms {
		switch {
		case s < 256:
			litSyms[s] = entry(kindLiteral, uint32(s), 0)
		case s == 256:
			litSyms[s] = entry(kindEOB, 0, 0)
		case s < 286:
			litSyms[s] = entry(kindLength, lengthBase[s-257], lengthExtra[s-257])
		default:
			litSyms[s] = entry(kindInvalid, 0, 0)
		}
	}
	for s := range distSyms {
		if s < 30 {
			distSyms[s] = entry(kindLiteral, distBase[s], distExtra[s])
		} else {
			distSyms[s] = entry(kindInvalid, 0, 0)
		}
	}
	for s := range clSyms {
		clSyms[s] = entry(kindLiteral, uint32(s), 0)
	}
	var lens [288]uint8
	for i := range lens {
		switch {
		case i < 144:
			lens[i] = 8
		case i < 256:
			lens[i] = 9
		case i < 280:
			lens[i] = 7
		default:
			lens[i] = 8
		}
	}
	var ok bool
	if fixedLit, ok = buildTable(nil, lens[:], litSyms[:], litTableBits); !ok {
		panic("gzran: fixed literal code")
	}
	for i := range 32 {
		lens[i] = 5
	}
	if fixedDist, ok = buildTable(nil, lens[:32], distSyms[:], distTableBits); !ok {
		panic("gzran: fixed distance code")
	}
}

func reverseBits(code uint32, n uint8) uint32 {
	var r uint32
	for range n {
		r = r<<1 | code&1
		code >>= 1
	}
	return r
}

// buildTable builds the decoding table of a canonical code given by its
// code lengths, reusing dst's storage. It refuses the codes compress/flate
// refuses: over-subscribed ones, and incomplete ones other than a single
// code of length 1. An empty code gives a table of invalid entries (an
// empty distance code is legal until a distance is needed).
func buildTable(dst []uint32, lengths []uint8, syms []uint32, tableBits uint) ([]uint32, bool) {
	var count [16]uint32
	var maxLen uint8
	for _, l := range lengths {
		if l != 0 {
			count[l]++
			maxLen = max(maxLen, l)
		}
	}
	size := 1 << tableBits
	dst = dst[:0]
	invalid := entry(kindInvalid, 0, 0)
	for range size {
		dst = append(dst, invalid)
	}
	if maxLen == 0 {
		return dst, true
	}
	var next [16]uint32
	code := uint32(0)
	for l := 1; l <= int(maxLen); l++ {
		code = (code + count[l-1]) << 1
		next[l] = code
	}
	// Completeness, as compress/flate computes it.
	total := uint32(0)
	for l := 1; l <= int(maxLen); l++ {
		total = total<<1 + count[l]
	}
	if total != 1<<maxLen && !(total == 1 && maxLen == 1) {
		return dst, false
	}
	// Subtable sizes per primary prefix.
	var subBits []uint8
	if uint(maxLen) > tableBits {
		subBits = make([]uint8, size)
	}
	codes := make([]uint32, len(lengths))
	for s, l := range lengths {
		if l == 0 {
			continue
		}
		codes[s] = reverseBits(next[l], l)
		next[l]++
		if uint(l) > tableBits {
			p := codes[s] & uint32(size-1)
			subBits[p] = max(subBits[p], l-uint8(tableBits))
		}
	}
	for p, sb := range subBits {
		if sb == 0 {
			continue
		}
		start := uint32(len(dst))
		for range 1 << sb {
			dst = append(dst, invalid)
		}
		dst[p] = entry(kindSub, start, uint32(sb))
	}
	for s, l := range lengths {
		if l == 0 {
			continue
		}
		e := syms[s] | uint32(l)
		c := codes[s]
		if uint(l) <= tableBits {
			for i := c; i < uint32(size); i += 1 << l {
				dst[i] = e
			}
			continue
		}
		ptr := dst[c&uint32(size-1)]
		start, sb := ptr>>8&0xffff, ptr>>4&15
		sub := c >> tableBits
		step := uint32(1) << (uint(l) - tableBits)
		for i := sub; i < 1<<sb; i += step {
			dst[start+i] = e
		}
	}
	return dst, true
}
