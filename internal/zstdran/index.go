// Package zstdran gives random access into zstd streams that have several
// frames: one streaming pass over a zstd stream records checkpoints at frame
// starts, and decoding can later resume at any checkpoint from the
// compressed bytes that follow it, so that an uncompressed range is read
// from the nearest checkpoint before it instead of from the start.
//
// Unlike DEFLATE (see internal/gzran), a zstd decoder cannot resume inside
// a frame: every block may refer to the frame's whole window, and its
// entropy tables carry over from block to block. A frame start is the only
// place with no state at all, so a checkpoint is just two offsets and the
// index is tiny. The price is that a stream of one frame (what `zstd` and
// most layer writers make by default) has a single checkpoint at its
// start, and gives no random access: callers check Index.Frames, or the
// number of checkpoints, and refuse to read such a layer lazily.
//
// Decoding is klauspost/compress/zstd's; this package only walks the frame
// structure (RFC 8878 section 3.1) as the compressed bytes pass, so that it
// knows where each frame ends without buffering it, and hands the decoder
// one frame at a time. Frames are always decoded whole, so each frame's
// content size and checksum are checked as usual. FuzzIndexer checks the
// walk against the decoder reading the whole stream.
package zstdran

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// DefaultSpan is the default uncompressed distance between checkpoints. A
// checkpoint costs a few bytes of index, so the span only bounds how many
// checkpoints a stream of many small frames records; a read from a
// checkpoint decodes up to a span plus one frame before the bytes it wants.
const DefaultSpan = 1 << 20

// MaxWindow is the largest frame window (history) a frame may ask for, the
// reference zstd decoder's default limit (window log 27): larger windows
// need `zstd --long=28` or more on both sides, and a hostile header must
// not make every reader allocate gigabytes.
const MaxWindow = 1 << 27

// Checkpoint is a place decoding can resume: the start of a data frame, or
// of the stream.
type Checkpoint struct {
	In  int64 // byte offset of a frame's magic number in the compressed stream
	Out int64 // uncompressed offset there
}

// Index is the checkpoint table of one zstd stream.
type Index struct {
	Span             int64
	CompressedSize   int64
	UncompressedSize int64
	Frames           int          // data frames seen (skippable frames not counted)
	Checkpoints      []Checkpoint // by Out, ascending; the first at In 0, Out 0
}

var decoderOptions = []zstd.DOption{
	// One decoder per frame stream, decoding in the caller's goroutine: no
	// goroutines to leak when a reader is dropped half-read.
	zstd.WithDecoderConcurrency(1),
	zstd.WithDecoderMaxWindow(MaxWindow),
	// For streams this caps the window too (single-segment frames use
	// their content size as the window).
	zstd.WithDecoderMaxMemory(MaxWindow),
}

// decoders are reused across frames (Reset) and readers: a decoder keeps
// its history buffer, which is up to a window long.
var decoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, decoderOptions...)
	if err != nil {
		panic(err) // the options are constant and valid
	}
	return d
}}

func putDecoder(d *zstd.Decoder) {
	d.Reset(nil) // drop the reference to the source
	decoders.Put(d)
}

// Frame magic numbers (RFC 8878 sections 3.1.1 and 3.1.2).
const (
	frameMagic         = 0xFD2FB528
	skippableMagic     = 0x184D2A50
	skippableMagicMask = 0xFFFFFFF0
)

// framer passes on the bytes of one data frame and then returns io.EOF,
// walking the frame's structure to know where it ends.
type framer struct {
	br    *bufio.Reader
	off   int64    // compressed offset of the next byte taken from br
	start int64    // compressed offset of the current frame's magic number
	hdr   [18]byte // largest frame header: magic, descriptor, window, dictionary id, content size
	pend  []byte   // header bytes taken from br and not yet passed on
	left  int64    // bytes of block content (or the checksum) still to pass on
	last  bool     // the current block is the frame's last
	sum   bool     // the frame ends with a checksum
	end   bool     // the frame is passed on once pend and left are
	err   error    // sticky: the source's error or a malformed structure
	types [3]int64 // blocks seen, by type (raw, RLE, compressed); for tests
}

func newFramer(r io.Reader, off int64) *framer {
	return &framer{br: bufio.NewReaderSize(r, 64<<10), off: off}
}

// fail records a source error; the end of the source is never expected
// while a frame is being read.
func (f *framer) fail(err error) error {
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	if f.err == nil {
		f.err = err
	}
	return f.err
}

func (f *framer) readFull(b []byte) error {
	n, err := io.ReadFull(f.br, b)
	f.off += int64(n)
	if err != nil {
		return f.fail(err)
	}
	return nil
}

// nextFrame reads up to the header of the next data frame, skipping
// skippable frames. It returns false at the clean end of the stream.
func (f *framer) nextFrame() (bool, error) {
	for {
		f.start = f.off
		n, err := io.ReadFull(f.br, f.hdr[:4])
		f.off += int64(n)
		if err == io.EOF {
			return false, nil
		}
		if err != nil {
			return false, f.fail(err)
		}
		m := binary.LittleEndian.Uint32(f.hdr[:4])
		if m&skippableMagicMask == skippableMagic {
			if err := f.readFull(f.hdr[4:8]); err != nil {
				return false, err
			}
			size := int64(binary.LittleEndian.Uint32(f.hdr[4:8]))
			n, err := f.br.Discard(int(size))
			f.off += int64(n)
			if err != nil {
				return false, f.fail(err)
			}
			continue
		}
		if m != frameMagic {
			return false, f.fail(fmt.Errorf("not a zstd frame (magic number %#08x)", m))
		}
		if err := f.readFull(f.hdr[4:5]); err != nil {
			return false, err
		}
		fhd := f.hdr[4]
		single := fhd&(1<<5) != 0
		size := 5 + [4]int{0, 1, 2, 4}[fhd&3] // dictionary id
		if !single {
			size++ // window descriptor
		}
		switch fcs := fhd >> 6; {
		case fcs != 0:
			size += 1 << fcs
		case single:
			size++
		}
		if err := f.readFull(f.hdr[5:size]); err != nil {
			return false, err
		}
		f.pend = f.hdr[:size]
		f.left, f.last, f.end = 0, false, false
		f.sum = fhd&(1<<2) != 0
		return true, nil
	}
}

// Read passes on the current frame's bytes, then returns io.EOF.
func (f *framer) Read(p []byte) (int, error) {
	for len(p) > 0 {
		if f.err != nil {
			return 0, f.err
		}
		if len(f.pend) > 0 {
			n := copy(p, f.pend)
			f.pend = f.pend[n:]
			return n, nil
		}
		if f.left > 0 {
			if int64(len(p)) > f.left {
				p = p[:f.left]
			}
			n, err := f.br.Read(p)
			f.off += int64(n)
			f.left -= int64(n)
			if err != nil {
				f.fail(err)
			}
			if n > 0 || err == nil {
				return n, nil
			}
			return 0, f.err
		}
		if f.end {
			return 0, io.EOF
		}
		if f.last {
			f.end = true
			if f.sum {
				f.left = 4
			}
			continue
		}
		// Block header (RFC 8878 section 3.1.1.2): 3 bytes little-endian,
		// bit 0 last block, bits 1-2 type, bits 3-23 size.
		if err := f.readFull(f.hdr[:3]); err != nil {
			return 0, err
		}
		h := uint32(f.hdr[0]) | uint32(f.hdr[1])<<8 | uint32(f.hdr[2])<<16
		f.last = h&1 != 0
		switch typ := (h >> 1) & 3; typ {
		case 0, 2: // raw, compressed: size bytes of content
			f.left = int64(h >> 3)
			f.types[typ]++
		case 1: // RLE: one byte, repeated size times
			f.left = 1
			f.types[typ]++
		default:
			return 0, f.fail(errors.New("reserved block type"))
		}
		f.pend = f.hdr[:3]
	}
	return 0, nil
}

// stream decodes the data frames after a framer's position one by one.
type stream struct {
	f       *framer
	dec     *zstd.Decoder
	out     int64 // uncompressed offset of the next byte returned
	frames  int
	inFrame bool
	atFrame func(in, out int64) error // called at each data frame's start
	atEnd   func() error              // called at the clean end of the stream
	err     error
}

func newStream(r io.Reader, in, out int64) *stream {
	return &stream{f: newFramer(r, in), dec: decoders.Get().(*zstd.Decoder), out: out}
}

// stop makes err sticky and releases the decoder.
func (s *stream) stop(err error) error {
	s.err = err
	if s.dec != nil {
		putDecoder(s.dec)
		s.dec = nil
	}
	return err
}

func (s *stream) frameErr(err error) error {
	if s.f.err != nil {
		err = s.f.err // the source's error, or bad structure, is the cause
	}
	return s.stop(fmt.Errorf("zstdran: frame at compressed offset %d: %w", s.f.start, err))
}

func (s *stream) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if !s.inFrame {
			ok, err := s.f.nextFrame()
			if err != nil {
				return 0, s.frameErr(err)
			}
			if !ok {
				if s.atEnd != nil {
					if err := s.atEnd(); err != nil {
						return 0, s.stop(err)
					}
				}
				return 0, s.stop(io.EOF)
			}
			if s.atFrame != nil {
				if err := s.atFrame(s.f.start, s.out); err != nil {
					return 0, s.stop(err)
				}
			}
			s.frames++
			if err := s.dec.Reset(s.f); err != nil {
				return 0, s.frameErr(err)
			}
			s.inFrame = true
		}
		n, err := s.dec.Read(p)
		s.out += int64(n)
		if err == io.EOF {
			// The decoder ends where it looks for the next frame and finds
			// the framer's end; anything else would be a frame cut short.
			if f := s.f; !f.end || f.left != 0 || len(f.pend) != 0 || f.err != nil {
				return n, s.frameErr(errors.New("decoder stopped inside the frame"))
			}
			s.inFrame = false
			if n > 0 {
				return n, nil
			}
			continue
		}
		if err != nil {
			return n, s.frameErr(err)
		}
		if n > 0 {
			return n, nil
		}
	}
}

// Indexer decompresses a zstd stream (one frame or several, skippable
// frames allowed, as RFC 8878 defines) passing the uncompressed bytes
// through Read, and records a checkpoint at the start of the first frame
// that begins at or after every span bytes of output (the first checkpoint
// at In 0, Out 0). Read it to the end (io.EOF); then Index returns the
// table.
type Indexer struct {
	s   *stream
	idx Index
}

// NewIndexer starts indexing the zstd stream r with checkpoints every span
// bytes of output (0 means DefaultSpan).
func NewIndexer(r io.Reader, span int64) *Indexer {
	if span <= 0 {
		span = DefaultSpan
	}
	x := &Indexer{s: newStream(r, 0, 0), idx: Index{Span: span, Checkpoints: []Checkpoint{{}}}}
	x.s.atFrame = func(in, out int64) error {
		if out-x.idx.Checkpoints[len(x.idx.Checkpoints)-1].Out >= span {
			x.idx.Checkpoints = append(x.idx.Checkpoints, Checkpoint{In: in, Out: out})
		}
		return nil
	}
	return x
}

// Read returns uncompressed bytes; io.EOF at the end of the stream. A
// corrupt or truncated stream is an error naming the compressed offset of
// the frame it is in.
func (x *Indexer) Read(p []byte) (int, error) {
	n, err := x.s.Read(p)
	if err == io.EOF {
		x.idx.CompressedSize = x.s.f.off
		x.idx.UncompressedSize = x.s.out
		x.idx.Frames = x.s.frames
	}
	return n, err
}

var errClosed = errors.New("zstdran: read from a closed Indexer")

// Close releases the decoder (it is released by itself at io.EOF or an
// error). Index still works after Close.
func (x *Indexer) Close() {
	if x.s.err == nil {
		x.s.stop(errClosed)
	}
}

// Index returns the table once Read returned io.EOF, else an error.
func (x *Indexer) Index() (*Index, error) {
	if x.s.err != io.EOF {
		return nil, errors.New("zstdran: index of a stream not read to its end")
	}
	idx := x.idx
	idx.Checkpoints = append([]Checkpoint(nil), x.idx.Checkpoints...)
	return &idx, nil
}

// LargestSpan returns the size of the largest span (the uncompressed
// bytes from a checkpoint to the next, or to the end) and its offset: what
// a reader must decode, and hold, to read any byte of it.
func (idx *Index) LargestSpan() (size, at int64) {
	for i, c := range idx.Checkpoints {
		end := idx.UncompressedSize
		if i+1 < len(idx.Checkpoints) {
			end = idx.Checkpoints[i+1].Out
		}
		if end-c.Out > size {
			size, at = end-c.Out, c.Out
		}
	}
	return size, at
}

// Find returns the index of the last checkpoint at or before uncompressed
// offset off.
func (idx *Index) Find(off int64) int {
	i := sort.Search(len(idx.Checkpoints), func(i int) bool { return idx.Checkpoints[i].Out > off })
	return max(0, i-1)
}

// NewReader resumes decoding at checkpoint i: r must yield the compressed
// stream from byte Checkpoints[i].In on. The reader returns the
// uncompressed stream from Checkpoints[i].Out to the end of the stream.
// Frames are decoded whole, so their content sizes and checksums are
// checked. Later checkpoints and the stream's end are checked against the
// index as they pass: a stream the index was not made from is an error,
// not bytes at the wrong offsets. The reader needs no Close: its decoder
// is released at io.EOF or an error, and one dropped before that holds no
// goroutine.
func (idx *Index) NewReader(i int, r io.Reader) (io.Reader, error) {
	if i < 0 || i >= len(idx.Checkpoints) {
		return nil, fmt.Errorf("zstdran: no checkpoint %d of %d", i, len(idx.Checkpoints))
	}
	c := idx.Checkpoints[i]
	s := newStream(r, c.In, c.Out)
	next := i + 1
	s.atFrame = func(in, out int64) error {
		if next < len(idx.Checkpoints) && in >= idx.Checkpoints[next].In {
			if want := idx.Checkpoints[next]; in != want.In || out != want.Out {
				return fmt.Errorf("zstdran: stream does not match its index: a frame at compressed offset %d, uncompressed %d, where the index has checkpoint %d at %d, %d",
					in, out, next, want.In, want.Out)
			}
			next++
		}
		return nil
	}
	s.atEnd = func() error {
		if s.f.off != idx.CompressedSize || s.out != idx.UncompressedSize {
			return fmt.Errorf("zstdran: stream does not match its index: it ends at compressed offset %d, uncompressed %d, the index says %d, %d",
				s.f.off, s.out, idx.CompressedSize, idx.UncompressedSize)
		}
		return nil
	}
	return s, nil
}

const magic = "rafszsi1"

// minFrame is the smallest data frame: magic number, descriptor, a window
// descriptor or one byte of content size, one block header.
const minFrame = 4 + 1 + 1 + 3

// MarshalBinary encodes the index compactly: magic, uvarints, checkpoint
// offsets as deltas.
func (idx *Index) MarshalBinary() ([]byte, error) {
	b := []byte(magic)
	for _, v := range []int64{idx.Span, idx.CompressedSize, idx.UncompressedSize, int64(idx.Frames), int64(len(idx.Checkpoints))} {
		b = binary.AppendUvarint(b, uint64(v))
	}
	var in, out int64
	for _, c := range idx.Checkpoints {
		b = binary.AppendUvarint(b, uint64(c.In-in))
		b = binary.AppendUvarint(b, uint64(c.Out-out))
		in, out = c.In, c.Out
	}
	return b, nil
}

// UnmarshalBinary decodes an index and checks that it is consistent: the
// first checkpoint at the start, later ones at least a span apart, inside
// the stream, no more of them than frames. Allocation is bounded by the
// input's length, whatever the counts it claims.
func (idx *Index) UnmarshalBinary(b []byte) error {
	bad := func(what string) error { return fmt.Errorf("zstdran: bad index: %s", what) }
	if len(b) < len(magic) || string(b[:len(magic)]) != magic {
		return bad("not a zstdran index")
	}
	b = b[len(magic):]
	next := func() (int64, bool) {
		v, n := binary.Uvarint(b)
		if n <= 0 || v > 1<<62 {
			return 0, false
		}
		b = b[n:]
		return int64(v), true
	}
	var h [5]int64
	for i := range h {
		v, ok := next()
		if !ok {
			return bad("truncated header")
		}
		h[i] = v
	}
	x := Index{Span: h[0], CompressedSize: h[1], UncompressedSize: h[2]}
	frames, n := h[3], h[4]
	// Every checkpoint takes at least 2 bytes.
	if x.Span < 1 || frames > x.CompressedSize/minFrame || (frames == 0 && x.UncompressedSize != 0) ||
		n < 1 || n > max(1, frames) || n > int64(len(b))/2 {
		return bad("inconsistent header")
	}
	x.Frames = int(frames)
	x.Checkpoints = make([]Checkpoint, 0, n)
	var in, out int64
	for i := range n {
		di, ok1 := next()
		do, ok2 := next()
		if !ok1 || !ok2 {
			return bad(fmt.Sprintf("checkpoint %d truncated", i))
		}
		in, out = in+di, out+do
		if (i == 0 && (in != 0 || out != 0)) || (i > 0 && (di < minFrame || do < x.Span)) ||
			in >= max(1, x.CompressedSize) || out > x.UncompressedSize {
			return bad(fmt.Sprintf("checkpoint %d out of place", i))
		}
		x.Checkpoints = append(x.Checkpoints, Checkpoint{In: in, Out: out})
	}
	if len(b) != 0 {
		return bad("trailing bytes")
	}
	*idx = x
	return nil
}
