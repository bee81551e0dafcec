package gzran

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// WindowSize is DEFLATE's history: a match reaches at most this far back.
const WindowSize = 32 << 10

const (
	maxMatch = 258
	// inBufSize is the compressed read buffer; inPad zero bytes follow the
	// real end of the input so that the fast loop can always load 8 bytes
	// (what it consumes of them is checked against the real end).
	inBufSize = 128 << 10
	inPad     = 16
	// outChunk is how much output is decoded between slides of the
	// history to the front of the output buffer.
	outChunk = 256 << 10
)

var (
	// ErrCorrupt is wrapped by every error about malformed gzip or DEFLATE
	// data.
	ErrCorrupt = errors.New("corrupt gzip data")
	// ErrChecksum is a member whose CRC-32 or size does not match its
	// trailer.
	ErrChecksum = fmt.Errorf("%w: checksum or size does not match the gzip trailer", ErrCorrupt)
)

func corrupt(bitOff int64, what string) error {
	return fmt.Errorf("%w: %s at compressed byte %d", ErrCorrupt, what, bitOff/8)
}

type state int

const (
	stHeader  state = iota // next: a gzip member header, or the end
	stBlock                // next: a DEFLATE block header
	stStored               // inside a stored block, stored bytes left
	stHuffman              // inside a Huffman-coded block
	stTrailer              // next: the member's CRC-32 and size
	stDone
)

// inflater decodes a gzip stream (members one after another) or, resumed
// at a checkpoint, the rest of one from a DEFLATE block boundary.
type inflater struct {
	src     io.Reader
	in      []byte // buffered input; after the source's end, inPad zeros follow
	ip      int    // next byte of in to load into bits
	inBase  int64  // stream offset of in[0]
	eof     bool   // the source is exhausted; realEnd is valid
	realEnd int    // index in in of the source's end (when eof)
	srcErr  error  // a source error other than io.EOF, reported when reached

	bits  uint64 // bit buffer, next bit lowest
	nbits uint

	out       []byte // out[:op] holds history and undelivered output
	op        int
	delivered int   // out[:delivered] went to the caller already
	histStart int   // earliest index of out a match may reach (member start)
	outBase   int64 // stream output offset of out[0]

	st      state
	final   bool // the current block is the member's last
	stored  int  // bytes left in a stored block
	lit     []uint32
	dist    []uint32
	litBuf  []uint32 // storage for dynamic tables
	distBuf []uint32
	clBuf   []uint32
	lengths [320]uint8
	members int
	resumed bool // no CRC or size to check for the first member
	crc     uint32
	memberN uint32 // output of the current member mod 2^32
	err     error

	// atBlock is called at every block boundary inside a member (before
	// the next block header is read), with the output offset there.
	atBlock func(bitOff, outOff int64)
}

func newInflater(src io.Reader, startByte int64) *inflater {
	return &inflater{
		src:    src,
		in:     make([]byte, 0, inBufSize+inPad),
		inBase: startByte,
		out:    make([]byte, WindowSize+outChunk+maxMatch),
	}
}

// checkable reports whether the current member's CRC and size can be
// checked: not for the member a resumed inflater starts inside (its
// beginning was never seen).
func (f *inflater) checkable() bool { return !f.resumed || f.members > 0 }

// bitOffset is the stream bit offset of the next unconsumed bit.
func (f *inflater) bitOffset() int64 { return (f.inBase+int64(f.ip))*8 - int64(f.nbits) }

// overread reports whether decoding consumed bits past the source's end
// (the zero padding): the input was truncated.
func (f *inflater) overread() bool {
	return f.eof && f.bitOffset() > (f.inBase+int64(f.realEnd))*8
}

// truncated is the error for input that ended early.
func (f *inflater) truncated() error {
	if f.srcErr != nil {
		return f.srcErr
	}
	return io.ErrUnexpectedEOF
}

// refill moves unread input to the front of in and reads more, so that at
// least 8 bytes can be loaded from ip; at the source's end it appends the
// zero padding instead.
func (f *inflater) refill() {
	if f.eof {
		return
	}
	if f.ip > 0 {
		n := copy(f.in[:cap(f.in)], f.in[f.ip:])
		f.inBase += int64(f.ip)
		f.in = f.in[:n]
		f.ip = 0
	}
	for len(f.in) < inBufSize && !f.eof {
		n, err := f.src.Read(f.in[len(f.in):inBufSize])
		f.in = f.in[:len(f.in)+n]
		if err != nil {
			if err != io.EOF {
				f.srcErr = err
			}
			f.eof = true
			f.realEnd = len(f.in)
			for range inPad {
				f.in = append(f.in, 0)
			}
		}
		if len(f.in)-f.ip >= 8 && n == 0 {
			break
		}
		if n > 0 && len(f.in)-f.ip >= 4<<10 {
			break // enough to go on with; do not wait on a slow source
		}
	}
}

// need makes sure at least n (≤ 56) bits are buffered. Past the source's
// end they are padding zeros: callers check overread where it matters.
func (f *inflater) need(n uint) {
	for f.nbits < n {
		if f.ip >= len(f.in) {
			f.refill()
			if f.ip >= len(f.in) {
				// Only after reading past the padding: treat as zeros.
				f.nbits += 8
				continue
			}
		}
		f.bits |= uint64(f.in[f.ip]) << f.nbits
		f.ip++
		f.nbits += 8
	}
}

func (f *inflater) take(n uint) uint32 {
	f.need(n)
	v := uint32(f.bits & (1<<n - 1))
	f.bits >>= n
	f.nbits -= n
	return v
}

func (f *inflater) alignByte() {
	n := f.nbits % 8
	f.bits >>= n
	f.nbits -= n
}

func (f *inflater) byte() (byte, error) {
	b := byte(f.take(8))
	if f.overread() {
		return 0, f.truncated()
	}
	return b, nil
}

// decodeSym decodes one symbol with table t (slow path, header code).
func (f *inflater) decodeSym(t []uint32, tableBits uint) uint32 {
	f.need(15)
	e := t[f.bits&(1<<tableBits-1)]
	if e>>24 == kindSub {
		e = t[e>>8&0xffff+uint32(f.bits>>tableBits)&(1<<(e>>4&15)-1)]
	}
	if e>>24 != kindInvalid {
		n := uint(e & 15)
		f.bits >>= n
		f.nbits -= n
	}
	return e
}

// slide moves the last WindowSize bytes of output to the front of out,
// once they were delivered.
func (f *inflater) slide() {
	if f.op < WindowSize+outChunk {
		return
	}
	shift := f.op - WindowSize
	copy(f.out, f.out[shift:f.op])
	f.op -= shift
	f.delivered -= shift
	f.histStart = max(0, f.histStart-shift)
	f.outBase += int64(shift)
}

// Read delivers decoded bytes.
func (f *inflater) Read(p []byte) (int, error) {
	for f.delivered == f.op {
		if f.err != nil {
			return 0, f.err
		}
		f.slide()
		f.err = f.step()
		if f.err != nil && f.err != io.EOF && f.overread() {
			f.err = f.truncated()
		}
	}
	n := copy(p, f.out[f.delivered:f.op])
	if f.checkable() {
		f.crc = crc32.Update(f.crc, crc32.IEEETable, f.out[f.delivered:f.delivered+n])
		f.memberN += uint32(n)
	}
	f.delivered += n
	return n, nil
}

// step decodes until some output is ready, the stream ends (io.EOF) or an
// error. The CRC of a member is updated as its output is delivered, so the
// trailer is checked only once everything before it was delivered.
func (f *inflater) step() error {
	for {
		switch f.st {
		case stHeader:
			if err := f.header(); err != nil {
				return err
			}
		case stBlock:
			if f.atBlock != nil {
				f.atBlock(f.bitOffset(), f.outBase+int64(f.op))
			}
			if err := f.blockHeader(); err != nil {
				return err
			}
		case stStored:
			n := min(f.stored, len(f.out)-f.op-maxMatch)
			if n <= 0 {
				return nil
			}
			if err := f.copyStored(n); err != nil {
				return err
			}
			f.stored -= n
			if f.stored == 0 {
				f.endBlock()
			}
			return nil
		case stHuffman:
			start := f.op
			if err := f.huffman(); err != nil {
				return err
			}
			if f.overread() {
				return f.truncated()
			}
			if f.op > start {
				return nil
			}
		case stTrailer:
			if f.delivered != f.op {
				return nil // the CRC must cover everything first
			}
			if err := f.trailer(); err != nil {
				return err
			}
		case stDone:
			return io.EOF
		}
	}
}

func (f *inflater) endBlock() {
	if f.final {
		f.st = stTrailer
	} else {
		f.st = stBlock
	}
}

// header reads a gzip member header, as compress/gzip does; the source's
// end before one is the end of the stream (after at least one member).
func (f *inflater) header() error {
	f.alignByte()
	start := f.bitOffset()
	f.need(8) // reads ahead, so that the source's end is known
	if f.eof && start >= (f.inBase+int64(f.realEnd))*8 {
		if f.srcErr != nil {
			return f.srcErr
		}
		if f.members == 0 && !f.resumed {
			return io.ErrUnexpectedEOF // no member at all
		}
		f.st = stDone
		return io.EOF
	}
	var hdr [10]byte
	for i := range hdr {
		b, err := f.byte()
		if err != nil {
			return err
		}
		hdr[i] = b
	}
	if hdr[0] != 0x1f || hdr[1] != 0x8b || hdr[2] != 8 {
		return corrupt(start, "not a gzip member header")
	}
	crc := crc32.ChecksumIEEE(hdr[:])
	flg := hdr[3]
	if flg&4 != 0 { // FEXTRA
		var l [2]byte
		for i := range l {
			b, err := f.byte()
			if err != nil {
				return err
			}
			l[i] = b
		}
		crc = crc32.Update(crc, crc32.IEEETable, l[:])
		n := int(binary.LittleEndian.Uint16(l[:]))
		for range n {
			b, err := f.byte()
			if err != nil {
				return err
			}
			crc = crc32.Update(crc, crc32.IEEETable, []byte{b})
		}
	}
	for _, fl := range []byte{8, 16} { // FNAME, FCOMMENT: NUL-terminated
		if flg&fl == 0 {
			continue
		}
		for i := 0; ; i++ {
			if i >= 512 { // compress/gzip's limit
				return corrupt(start, "gzip header string longer than 512 bytes")
			}
			b, err := f.byte()
			if err != nil {
				return err
			}
			crc = crc32.Update(crc, crc32.IEEETable, []byte{b})
			if b == 0 {
				break
			}
		}
	}
	if flg&2 != 0 { // FHCRC
		lo, err := f.byte()
		if err != nil {
			return err
		}
		hi, err := f.byte()
		if err != nil {
			return err
		}
		if uint16(lo)|uint16(hi)<<8 != uint16(crc) {
			return corrupt(start, "gzip header checksum mismatch")
		}
	}
	f.members++
	f.crc, f.memberN = 0, 0
	f.histStart = f.op
	f.st = stBlock
	return nil
}

func (f *inflater) trailer() error {
	f.alignByte()
	var t [8]byte
	for i := range t {
		b, err := f.byte()
		if err != nil {
			return err
		}
		t[i] = b
	}
	if f.checkable() {
		if binary.LittleEndian.Uint32(t[:4]) != f.crc || binary.LittleEndian.Uint32(t[4:]) != f.memberN {
			return ErrChecksum
		}
	}
	f.st = stHeader
	return nil
}

func (f *inflater) blockHeader() error {
	start := f.bitOffset()
	h := f.take(3)
	if f.overread() {
		return f.truncated()
	}
	f.final = h&1 != 0
	switch h >> 1 {
	case 0:
		f.alignByte()
		v := f.take(32)
		if f.overread() {
			return f.truncated()
		}
		n, nn := uint16(v), uint16(v>>16)
		if n != ^nn {
			return corrupt(start, "stored block length check failed")
		}
		f.stored = int(n)
		if n == 0 {
			f.endBlock()
		} else {
			f.st = stStored
		}
		return nil
	case 1:
		f.lit, f.dist = fixedLit, fixedDist
	case 2:
		if err := f.dynamic(start); err != nil {
			return err
		}
	default:
		return corrupt(start, "reserved block type")
	}
	f.st = stHuffman
	return nil
}

var clOrder = [19]int{16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15}

func (f *inflater) dynamic(start int64) error {
	nlit := int(f.take(5)) + 257
	ndist := int(f.take(5)) + 1
	nclen := int(f.take(4)) + 4
	if nlit > 286 || ndist > 30 {
		return corrupt(start, "too many length or distance codes")
	}
	var cl [19]uint8
	for i := range nclen {
		cl[clOrder[i]] = uint8(f.take(3))
	}
	var ok bool
	if f.clBuf, ok = buildTable(f.clBuf, cl[:], clSyms[:], clTableBits); !ok {
		return corrupt(start, "bad code length code")
	}
	lens := f.lengths[:nlit+ndist]
	for i := 0; i < len(lens); {
		e := f.decodeSym(f.clBuf, clTableBits)
		if e>>24 == kindInvalid {
			return corrupt(start, "bad code length")
		}
		if f.overread() {
			return f.truncated()
		}
		sym := e >> 8 & 0xffff
		if sym < 16 {
			lens[i] = uint8(sym)
			i++
			continue
		}
		var rep int
		var val uint8
		switch sym {
		case 16:
			if i == 0 {
				return corrupt(start, "repeat with no previous length")
			}
			val = lens[i-1]
			rep = 3 + int(f.take(2))
		case 17:
			rep = 3 + int(f.take(3))
		default:
			rep = 11 + int(f.take(7))
		}
		if i+rep > len(lens) {
			return corrupt(start, "code lengths overflow")
		}
		for range rep {
			lens[i] = val
			i++
		}
	}
	if f.overread() {
		return f.truncated()
	}
	if f.litBuf, ok = buildTable(f.litBuf, lens[:nlit], litSyms[:], litTableBits); !ok {
		return corrupt(start, "bad literal/length code")
	}
	if f.distBuf, ok = buildTable(f.distBuf, lens[nlit:], distSyms[:], distTableBits); !ok {
		return corrupt(start, "bad distance code")
	}
	f.lit, f.dist = f.litBuf, f.distBuf
	return nil
}

func (f *inflater) copyStored(n int) error {
	// The bit buffer holds whole bytes now (aligned); drain it first.
	for n > 0 && f.nbits >= 8 {
		f.out[f.op] = byte(f.bits)
		f.bits >>= 8
		f.nbits -= 8
		f.op++
		n--
	}
	if f.nbits == 0 {
		// Bits above nbits mirror in[ip:], which the copy below
		// consumes directly: drop them.
		f.bits = 0
	}
	for n > 0 {
		if f.ip >= len(f.in) || f.eof && f.ip >= f.realEnd {
			f.refill()
			if f.eof && f.ip >= f.realEnd {
				return f.truncated()
			}
		}
		end := len(f.in)
		if f.eof {
			end = f.realEnd
		}
		c := copy(f.out[f.op:f.op+n], f.in[f.ip:end])
		f.ip += c
		f.op += c
		n -= c
	}
	return nil
}

// huffman decodes symbols of the current block until the block ends or
// out is nearly full. The hot loop keeps its state in locals and loads 8
// input bytes at a time, which the padding after the input's end allows.
func (f *inflater) huffman() error {
	bits, nbits := f.bits, f.nbits
	in, ip := f.in, f.ip
	out, op := f.out, f.op
	lit, dist := f.lit, f.dist
	const litMask, distMask = 1<<litTableBits - 1, 1<<distTableBits - 1
	outLimit := len(out) - maxMatch
	histStart := f.histStart
	var err error
	for op < outLimit {
		if ip+8 > len(in) {
			if f.eof {
				break // consumed padding: overread
			}
			f.bits, f.nbits, f.ip, f.op = bits, nbits, ip, op
			f.refill()
			in, ip = f.in, f.ip
			if ip+8 > len(in) {
				// Too little input for the fast loop: one symbol at a
				// time through need(), which pads.
				f.need(56)
				bits, nbits, in, ip = f.bits, f.nbits, f.in, f.ip
				goto decode
			}
		}
		bits |= binary.LittleEndian.Uint64(in[ip:]) << nbits
		ip += int(63-nbits) >> 3
		nbits |= 56
	decode:
		e := lit[bits&litMask]
		if e>>24 == kindSub {
			e = lit[e>>8&0xffff+uint32(bits>>litTableBits)&(1<<(e>>4&15)-1)]
		}
		n := uint(e & 15)
		bits >>= n
		nbits -= n
		switch e >> 24 {
		case kindLiteral:
			out[op] = byte(e >> 8)
			op++
			continue
		case kindEOB:
			f.bits, f.nbits, f.ip, f.op = bits, nbits, ip, op
			f.endBlock()
			return nil
		case kindInvalid:
			err = corrupt((f.inBase+int64(ip))*8-int64(nbits), "invalid literal/length code")
			goto fail
		}
		// A length, then a distance: at most 5+15+13 more bits, which the
		// 56 loaded cover.
		x := uint(e >> 4 & 15)
		length := int(e>>8&0xffff) + int(bits&(1<<x-1))
		bits >>= x
		nbits -= x
		e = dist[bits&distMask]
		if e>>24 == kindSub {
			e = dist[e>>8&0xffff+uint32(bits>>distTableBits)&(1<<(e>>4&15)-1)]
		}
		if e>>24 == kindInvalid {
			err = corrupt((f.inBase+int64(ip))*8-int64(nbits), "invalid distance code")
			goto fail
		}
		n = uint(e & 15)
		bits >>= n
		nbits -= n
		x = uint(e >> 4 & 15)
		d := int(e>>8&0xffff) + int(bits&(1<<x-1))
		bits >>= x
		nbits -= x
		if d > op-histStart {
			err = corrupt((f.inBase+int64(ip))*8-int64(nbits), "match distance too far back")
			goto fail
		}
		if d >= length {
			copy(out[op:op+length], out[op-d:])
			op += length
		} else {
			// Overlapping: the pattern of d bytes repeats; copy in
			// doubling runs.
			end := op + length
			for op < end {
				c := copy(out[op:end], out[op-d:op])
				op += c
			}
		}
	}
	f.bits, f.nbits, f.ip, f.op = bits, nbits, ip, op
	return nil
fail:
	f.bits, f.nbits, f.ip, f.op = bits, nbits, ip, op
	return err
}
