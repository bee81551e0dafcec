// Package gzran gives random access into gzip streams: one streaming pass
// over a gzip stream (one member or several) records checkpoints, and
// inflation can later resume at any checkpoint from the compressed bytes
// that follow it, so that an uncompressed range is read from the nearest
// checkpoint before it instead of from the start (zlib's zran.c idea).
//
// A checkpoint sits at a DEFLATE block boundary, where the decoder's only
// state is the bit position and the last 32 KiB of output (the window
// matches may reach into); checkpoints are taken at the first boundary
// after every span of output, so a read from a checkpoint inflates at most
// a span plus one block before the bytes it wants. Windows are kept
// zstd-compressed.
//
// The inflater is written here because nothing served did this: Go's
// compress/flate (and klauspost/compress/flate) cannot start at a bit
// offset with a preset window across block boundaries, and the Go module
// proxy serves neither github.com/timpalpant/gzran nor
// github.com/jonjohnsonjr/targz. It is checked against compress/gzip by
// FuzzInflate and the tests, and rejects what compress/gzip rejects
// (bad headers, codes, distances, checksums).
package gzran

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// DefaultSpan is the default uncompressed distance between checkpoints.
// Each costs about one compressed window (typically 8-16 KiB of the 32 KiB)
// in the index; a read from a checkpoint inflates up to a span first.
// Measured by scripts/bench-lazy-oci.sh (200 MiB synthetic image, 134 MB
// compressed): 256 KiB made the index artifact 9.7% of the image, 512 KiB
// 5.6%, 1 MiB 3.0% (issue 12 wants <= 5%), while a cold 4 KiB read cost
// 257, 423 and 730 KB per request at a p50 of 9.3, 9.2 and 11.0 ms: the
// smaller spans buy little latency for an index over the bound.
const DefaultSpan = 1 << 20

// Checkpoint is a place inflation can resume.
type Checkpoint struct {
	In        int64 // bit offset of a DEFLATE block header in the compressed stream
	Out       int64 // uncompressed offset there
	WindowLen int   // bytes of output before Out that the window holds (≤ WindowSize)
	// Window is those bytes, zstd-compressed, as the Indexer made them. An
	// index read back by UnmarshalBinary has no windows (they are stored
	// apart, see Windows) but where each lies in the windows blob and its
	// digest, so that a reader fetches only the windows it resumes at.
	Window       []byte
	WindowAt     int64             // offset in the windows blob
	WindowStored int               // compressed bytes of the window
	WindowSum    [sha256.Size]byte // sha256 of them
}

// Index is the checkpoint table of one gzip stream.
type Index struct {
	Span             int64
	CompressedSize   int64
	UncompressedSize int64
	Checkpoints      []Checkpoint // by Out, ascending; the first at Out 0
}

var (
	zenc = sync.OnceValue(func() *zstd.Encoder {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(false), zstd.WithZeroFrames(true), zstd.WithWindowSize(WindowSize))
		if err != nil {
			panic(err)
		}
		return e
	})
	zdec = sync.OnceValue(func() *zstd.Decoder {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(WindowSize))
		if err != nil {
			panic(err)
		}
		return d
	})
)

// Indexer inflates a gzip stream, recording checkpoints as it goes. Read
// it to the end (io.EOF); then Index returns the table.
type Indexer struct {
	f   *inflater
	idx Index
	err error
}

// NewIndexer starts indexing the gzip stream r with checkpoints every span
// bytes of output (0 means DefaultSpan).
func NewIndexer(r io.Reader, span int64) *Indexer {
	if span <= 0 {
		span = DefaultSpan
	}
	x := &Indexer{f: newInflater(r, 0), idx: Index{Span: span}}
	x.f.atBlock = x.atBlock
	return x
}

func (x *Indexer) atBlock(bitOff, outOff int64) {
	cps := x.idx.Checkpoints
	if len(cps) > 0 && outOff-cps[len(cps)-1].Out < x.idx.Span {
		return
	}
	f := x.f
	w := f.out[max(0, f.op-WindowSize):f.op]
	c := Checkpoint{In: bitOff, Out: outOff, WindowLen: len(w), Window: zenc().EncodeAll(w, make([]byte, 0, len(w)/2))}
	if len(cps) > 0 {
		last := &cps[len(cps)-1]
		c.WindowAt = last.WindowAt + int64(last.WindowStored)
	}
	c.WindowStored, c.WindowSum = len(c.Window), sha256.Sum256(c.Window)
	x.idx.Checkpoints = append(cps, c)
}

// Read returns uncompressed bytes.
func (x *Indexer) Read(p []byte) (int, error) {
	if x.err != nil {
		return 0, x.err
	}
	n, err := x.f.Read(p)
	x.idx.UncompressedSize += int64(n)
	if err == io.EOF {
		x.idx.CompressedSize = x.f.inBase + int64(x.f.realEnd)
	}
	x.err = err
	return n, err
}

// Index returns the table once Read returned io.EOF, else an error.
func (x *Indexer) Index() (*Index, error) {
	if x.err != io.EOF {
		return nil, errors.New("gzran: index of a stream not read to its end")
	}
	idx := x.idx
	return &idx, nil
}

// Find returns the index of the last checkpoint at or before uncompressed
// offset off.
func (idx *Index) Find(off int64) int {
	i := sort.Search(len(idx.Checkpoints), func(i int) bool { return idx.Checkpoints[i].Out > off })
	return max(0, i-1)
}

// rawWindow checks stored, the checkpoint's window as stored, against
// the index and decompresses it.
func (c *Checkpoint) rawWindow(stored []byte) ([]byte, error) {
	if len(stored) != c.WindowStored || sha256.Sum256(stored) != c.WindowSum {
		return nil, errors.New("gzran: checkpoint window does not match the index (changed or misplaced)")
	}
	w, err := zdec().DecodeAll(stored, make([]byte, 0, c.WindowLen))
	if err != nil {
		return nil, fmt.Errorf("gzran: checkpoint window: %w", err)
	}
	if len(w) != c.WindowLen {
		return nil, fmt.Errorf("gzran: checkpoint window has %d bytes, the index says %d", len(w), c.WindowLen)
	}
	return w, nil
}

// NewReader resumes inflation at checkpoint i: window is the checkpoint's
// window as stored (its Window, or the bytes of the windows blob at its
// WindowAt; checked against WindowSum), and r must yield the compressed
// stream from byte Checkpoints[i].In/8 on. The reader returns the
// uncompressed stream from Checkpoints[i].Out to the end of the gzip
// stream (later members included). The member it starts in has no CRC
// check (its beginning is not read): callers verify the bytes otherwise.
func (idx *Index) NewReader(i int, window []byte, r io.Reader) (io.Reader, error) {
	if i < 0 || i >= len(idx.Checkpoints) {
		return nil, fmt.Errorf("gzran: no checkpoint %d of %d", i, len(idx.Checkpoints))
	}
	c := &idx.Checkpoints[i]
	w, err := c.rawWindow(window)
	if err != nil {
		return nil, err
	}
	f := newInflater(r, c.In/8)
	f.resumed = true
	f.take(uint(c.In % 8))
	f.op = copy(f.out, w)
	f.delivered = f.op
	f.outBase = c.Out - int64(f.op)
	f.st = stBlock
	return f, nil
}

// Windows returns the windows blob: every checkpoint's window, in order,
// each at its WindowAt. It is stored apart from the table (MarshalBinary)
// because a reader needs only the windows of the checkpoints it resumes
// at, while the table is small and read whole.
func (idx *Index) Windows() []byte {
	var b []byte
	for _, c := range idx.Checkpoints {
		b = append(b, c.Window...)
	}
	return b
}

// WindowsSize is the size of the windows blob.
func (idx *Index) WindowsSize() int64 {
	if n := len(idx.Checkpoints); n > 0 {
		return idx.Checkpoints[n-1].WindowAt + int64(idx.Checkpoints[n-1].WindowStored)
	}
	return 0
}

const magic = "rafsgzi2"

// Limits on an index read back, so that a hostile one cannot make
// Unmarshal allocate without bound.
const (
	maxCheckpoints  = 1 << 24
	maxStoredWindow = 2 * WindowSize // zstd never stores 32 KiB in more than a few bytes over it
)

// MarshalBinary encodes the table compactly (varint deltas, and each
// window's stored size and sha256); the windows themselves are Windows.
func (idx *Index) MarshalBinary() ([]byte, error) {
	b := []byte(magic)
	b = binary.AppendUvarint(b, uint64(idx.Span))
	b = binary.AppendUvarint(b, uint64(idx.CompressedSize))
	b = binary.AppendUvarint(b, uint64(idx.UncompressedSize))
	b = binary.AppendUvarint(b, uint64(len(idx.Checkpoints)))
	var in, out int64
	for _, c := range idx.Checkpoints {
		b = binary.AppendUvarint(b, uint64(c.In-in))
		b = binary.AppendUvarint(b, uint64(c.Out-out))
		b = binary.AppendUvarint(b, uint64(c.WindowLen))
		b = binary.AppendUvarint(b, uint64(c.WindowStored))
		b = append(b, c.WindowSum[:]...)
		in, out = c.In, c.Out
	}
	return b, nil
}

// UnmarshalBinary decodes a table and checks that it is consistent:
// checkpoints in order, inside the stream, windows no longer than the
// output before them. The checkpoints have no Window: see NewReader.
func (idx *Index) UnmarshalBinary(b []byte) error {
	bad := func(what string) error { return fmt.Errorf("gzran: bad index: %s", what) }
	if len(b) < len(magic) || string(b[:len(magic)]) != magic {
		return bad("not a gzran index")
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
	var x Index
	var n int64
	var ok [4]bool
	x.Span, ok[0] = next()
	x.CompressedSize, ok[1] = next()
	x.UncompressedSize, ok[2] = next()
	n, ok[3] = next()
	if ok != [4]bool{true, true, true, true} || n > maxCheckpoints || n > int64(len(b)) {
		return bad("truncated header")
	}
	x.Checkpoints = make([]Checkpoint, 0, n)
	var in, out, at int64
	for i := range n {
		di, ok1 := next()
		do, ok2 := next()
		wl, ok3 := next()
		ws, ok4 := next()
		if !ok1 || !ok2 || !ok3 || !ok4 || len(b) < sha256.Size {
			return bad(fmt.Sprintf("checkpoint %d truncated", i))
		}
		in, out = in+di, out+do
		if in/8 >= x.CompressedSize || out > x.UncompressedSize || wl > WindowSize || wl > out ||
			(i == 0 && out != 0) || (i > 0 && (di == 0 || do == 0)) {
			return bad(fmt.Sprintf("checkpoint %d out of place", i))
		}
		if ws > maxStoredWindow {
			return bad(fmt.Sprintf("checkpoint %d: a %d-byte stored window", i, ws))
		}
		c := Checkpoint{In: in, Out: out, WindowLen: int(wl), WindowAt: at, WindowStored: int(ws)}
		copy(c.WindowSum[:], b)
		b = b[sha256.Size:]
		x.Checkpoints = append(x.Checkpoints, c)
		at += ws
	}
	if len(b) != 0 {
		return bad("trailing bytes")
	}
	if len(x.Checkpoints) == 0 && x.UncompressedSize > 0 {
		return bad("no checkpoints")
	}
	*idx = x
	return nil
}
