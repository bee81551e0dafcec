package zstdran

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"github.com/klauspost/compress/zstd"
)

// text is compressible, varied data: words, repeats at all distances.
func text(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	words := []string{"usr", "lib", "share", "locale", "the ", "and ", "\x00\x00\x00\x00", "GNU ", "x86_64", "\n"}
	var b []byte
	for len(b) < n {
		if r.IntN(2) == 0 || len(b) == 0 {
			for range r.IntN(200) {
				b = append(b, words[r.IntN(len(words))]...)
			}
			continue
		}
		d := 1 + r.IntN(min(len(b), 100000))
		for range r.IntN(600) {
			b = append(b, b[len(b)-d])
		}
	}
	return b[:n]
}

// random is incompressible: the encoder stores it in raw blocks.
func random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func encoder(t testing.TB, opts ...zstd.EOption) *zstd.Encoder {
	e, err := zstd.NewWriter(nil, append([]zstd.EOption{zstd.WithEncoderConcurrency(1)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// streamed compresses through the Writer, which knows no content size.
func streamed(t testing.TB, data []byte, opts ...zstd.EOption) []byte {
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf, append([]zstd.EOption{zstd.WithEncoderConcurrency(1)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func skippable(nibble byte, payload []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, skippableMagic|uint32(nibble))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// layer is a built stream and what a correct index of it has.
type layer struct {
	z, data []byte
	starts  []Checkpoint // every data frame's start
}

func (l *layer) add(t testing.TB, frame, data []byte) {
	if data != nil {
		if fh, err := frameHeader(frame); err != nil {
			t.Fatalf("test frame: %v", err)
		} else if !fh {
			t.Fatalf("test frame is not a data frame")
		}
		l.starts = append(l.starts, Checkpoint{In: int64(len(l.z)), Out: int64(len(l.data))})
	}
	l.z = append(l.z, frame...)
	l.data = append(l.data, data...)
}

func frameHeader(b []byte) (bool, error) {
	if len(b) < 4 {
		return false, errors.New("short")
	}
	return binary.LittleEndian.Uint32(b) == frameMagic, nil
}

// want is the checkpoint rule spelled out independently: the stream's
// start, then every data frame start at least span past the last one.
func (l *layer) want(span int64) []Checkpoint {
	cps := []Checkpoint{{}}
	for _, s := range l.starts {
		if s.Out-cps[len(cps)-1].Out >= span {
			cps = append(cps, s)
		}
	}
	return cps
}

// mixed has every kind of frame: with and without content size and
// checksum, single-segment or not, empty, raw/RLE/compressed blocks, many
// small frames between checkpoints, skippable frames at the start, in the
// middle and at the end (where zstd:chunked keeps its manifest).
func mixed(t testing.TB) *layer {
	mixedOnce.Do(func() { mixedLayer = makeMixed(t) })
	return mixedLayer
}

var (
	mixedOnce  sync.Once
	mixedLayer *layer
)

func makeMixed(t testing.TB) *layer {
	var l layer
	def := encoder(t)
	noCRC := encoder(t, zstd.WithEncoderCRC(false), zstd.WithEncoderLevel(zstd.SpeedFastest))
	best := encoder(t, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithSingleSegment(false), zstd.WithWindowSize(1<<17))
	zero := encoder(t, zstd.WithZeroFrames(true))
	l.add(t, skippable(0xA, []byte("manifest-ish")), nil)
	d := text(1, 300<<10)
	l.add(t, def.EncodeAll(d, nil), d)
	d = random(2, 200<<10)
	l.add(t, noCRC.EncodeAll(d, nil), d)
	l.add(t, zero.EncodeAll(nil, nil), []byte{})
	d = bytes.Repeat([]byte{'r'}, 400<<10)
	l.add(t, streamed(t, d), d)
	l.add(t, skippable(0, nil), nil)
	l.add(t, skippable(0xF, random(3, 1000)), nil)
	d = text(4, 50<<10)
	l.add(t, streamed(t, d, zstd.WithEncoderCRC(false), zstd.WithWindowSize(1<<16)), d)
	d = text(5, 1<<20)
	l.add(t, best.EncodeAll(d, nil), d)
	for i := range 40 {
		d = text(uint64(100+i), 10<<10)
		l.add(t, def.EncodeAll(d, nil), d)
	}
	l.add(t, zero.EncodeAll(nil, nil), []byte{})
	d = append(random(6, 150<<10), bytes.Repeat([]byte{0}, 300<<10)...)
	l.add(t, streamed(t, d, zstd.WithEncoderLevel(zstd.SpeedBetterCompression)), d)
	l.add(t, skippable(5, random(7, 5000)), nil)
	return &l
}

func decoder(t testing.TB) *zstd.Decoder {
	d, err := zstd.NewReader(nil, decoderOptions...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

// index decodes z fully through an Indexer, checking the output.
func index(t testing.TB, z, want []byte, span int64, r func(io.Reader) io.Reader) (*Index, *Indexer) {
	t.Helper()
	x := NewIndexer(r(bytes.NewReader(z)), span)
	got, err := io.ReadAll(x)
	if err != nil {
		t.Fatalf("decode: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("decode: %d bytes differ from the %d expected", len(got), len(want))
	}
	idx, err := x.Index()
	if err != nil {
		t.Fatal(err)
	}
	if idx.CompressedSize != int64(len(z)) || idx.UncompressedSize != int64(len(want)) {
		t.Fatalf("sizes %d/%d, want %d/%d", idx.CompressedSize, idx.UncompressedSize, len(z), len(want))
	}
	return idx, x
}

// checkResume round-trips the index through its encoding, then reads from
// every checkpoint (at most limit of them, spread out, when limit > 0) to
// the end and compares.
func checkResume(t testing.TB, idx *Index, z, want []byte, limit int) {
	t.Helper()
	b, err := idx.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var back Index
	if err := back.UnmarshalBinary(b); err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	if !reflect.DeepEqual(&back, idx) {
		t.Fatalf("round trip: %+v, want %+v", back, *idx)
	}
	step := 1
	if limit > 0 && len(back.Checkpoints) > limit {
		step = (len(back.Checkpoints) + limit - 1) / limit
	}
	for i := 0; i < len(back.Checkpoints); i += step {
		c := back.Checkpoints[i]
		r, err := back.NewReader(i, bytes.NewReader(z[c.In:]))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatalf("checkpoint %d (in %d out %d): %v", i, c.In, c.Out, err)
		}
		if !bytes.Equal(got, want[c.Out:]) {
			t.Fatalf("checkpoint %d (in %d out %d): %d bytes differ from the %d expected", i, c.In, c.Out, len(got), len(want)-int(c.Out))
		}
	}
}

func TestIndexAndResume(t *testing.T) {
	l := mixed(t)
	readers := map[string]func(io.Reader) io.Reader{
		"plain": func(r io.Reader) io.Reader { return r },
		"half":  iotest.HalfReader,
		"byte":  iotest.OneByteReader,
	}
	for name, rd := range readers {
		for _, span := range []int64{1, 128 << 10, 300 << 10, 1 << 30} {
			idx, x := index(t, l.z, l.data, span, rd)
			if idx.Frames != len(l.starts) {
				t.Errorf("%s span %d: %d frames, want %d", name, span, idx.Frames, len(l.starts))
			}
			if want := l.want(span); !reflect.DeepEqual(idx.Checkpoints, want) {
				t.Errorf("%s span %d: checkpoints\n%v\nwant\n%v", name, span, idx.Checkpoints, want)
			}
			if n := len(idx.Checkpoints); span == 128<<10 && n < 7 {
				t.Errorf("%s: %d checkpoints at span 128 KiB", name, n)
			}
			// The stream has every block type the walk must size.
			if ty := x.s.f.types; ty[0] == 0 || ty[1] == 0 || ty[2] == 0 {
				t.Errorf("%s: blocks by type (raw, RLE, compressed) %v: a type is missing from the test stream", name, ty)
			}
			if name == "plain" {
				checkResume(t, idx, l.z, l.data, 0)
			}
		}
	}
}

func TestFind(t *testing.T) {
	l := mixed(t)
	idx, _ := index(t, l.z, l.data, 256<<10, func(r io.Reader) io.Reader { return r })
	cps := idx.Checkpoints
	for i, c := range cps {
		for _, off := range []int64{c.Out, c.Out + 1, c.Out - 1} {
			want := i
			if off < c.Out {
				want = max(0, i-1)
			}
			if i == len(cps)-1 || off < cps[i+1].Out {
				if got := idx.Find(off); got != want {
					t.Errorf("Find(%d) = %d, want %d", off, got, want)
				}
			}
		}
	}
	if got := idx.Find(-5); got != 0 {
		t.Errorf("Find(-5) = %d", got)
	}
	if got := idx.Find(idx.UncompressedSize + 100); got != len(cps)-1 {
		t.Errorf("Find(past the end) = %d", got)
	}
	// A read from Find's checkpoint reaches any offset.
	for _, off := range []int64{0, 1, 300 << 10, idx.UncompressedSize / 2, idx.UncompressedSize - 1} {
		i := idx.Find(off)
		c := cps[i]
		r, _ := idx.NewReader(i, bytes.NewReader(l.z[c.In:]))
		got := make([]byte, off-c.Out+1)
		if _, err := io.ReadFull(r, got); err != nil || got[len(got)-1] != l.data[off] {
			t.Errorf("offset %d from checkpoint %d: %v", off, i, err)
		}
	}
}

// A single frame, whatever its size, is one checkpoint: no random access.
func TestSingleFrame(t *testing.T) {
	d := text(9, 3<<20)
	for _, z := range [][]byte{encoder(t).EncodeAll(d, nil), streamed(t, d)} {
		idx, _ := index(t, z, d, 64<<10, func(r io.Reader) io.Reader { return r })
		if idx.Frames != 1 || len(idx.Checkpoints) != 1 || idx.Checkpoints[0] != (Checkpoint{}) {
			t.Errorf("frames %d, checkpoints %v", idx.Frames, idx.Checkpoints)
		}
		checkResume(t, idx, z, d, 0)
	}
	// Nothing at all, or only skippable frames, is a valid empty stream.
	for _, z := range [][]byte{nil, skippable(1, []byte("x"))} {
		idx, _ := index(t, z, nil, 0, func(r io.Reader) io.Reader { return r })
		if idx.Frames != 0 || len(idx.Checkpoints) != 1 || idx.Span != DefaultSpan {
			t.Errorf("empty stream: %+v", idx)
		}
		checkResume(t, idx, z, nil, 0)
	}
}

// readAll reads through an Indexer, and checks that an error names the
// compressed offset.
func readAll(t *testing.T, name string, z []byte) ([]byte, error) {
	t.Helper()
	x := NewIndexer(bytes.NewReader(z), 1000)
	defer x.Close()
	got, err := io.ReadAll(x)
	if err != nil && !strings.Contains(err.Error(), "zstdran: frame at compressed offset ") {
		t.Errorf("%s: error %q does not name the offset", name, err)
	}
	if err == nil {
		if _, ierr := x.Index(); ierr != nil {
			t.Errorf("%s: %v", name, ierr)
		}
	} else if _, ierr := x.Index(); ierr == nil {
		t.Errorf("%s: an index of a failed stream", name)
	}
	return got, err
}

func TestErrors(t *testing.T) {
	var l layer
	crc := encoder(t, zstd.WithEncoderCRC(true))
	for i, d := range [][]byte{text(20, 6<<10), random(21, 1000), bytes.Repeat([]byte{7}, 20000), text(22, 100)} {
		if i == 1 {
			l.add(t, skippable(3, []byte("skip me")), nil)
		}
		l.add(t, crc.EncodeAll(d, nil), d)
	}
	frameEnd := map[int]bool{}
	for _, s := range l.starts {
		frameEnd[int(s.In)] = true
	}
	frameEnd[len(l.z)] = true
	frameEnd[int(l.starts[1].In)-15] = true // the skippable frame's start
	// Every cut inside a frame is an error; a cut between frames is not.
	for n := range len(l.z) {
		_, err := readAll(t, "truncated", l.z[:n])
		if (err == nil) != frameEnd[n] {
			t.Fatalf("cut at %d of %d: %v", n, len(l.z), err)
		}
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("cut at %d: %v, want unexpected EOF", n, err)
		}
	}
	// A flipped bit gives what the decoder gives over the whole stream,
	// and every frame here has a checksum, so most flips are errors.
	ref := decoder(t)
	refused := 0
	for i := range len(l.z) {
		z := append([]byte{}, l.z...)
		z[i] ^= 1 << (i % 8)
		got, err := readAll(t, "flipped", z)
		ref.Reset(bytes.NewReader(z))
		want, werr := io.ReadAll(ref)
		if werr == nil && (err != nil || !bytes.Equal(got, want)) {
			t.Fatalf("flip at %d: decoder accepts, zstdran: %v", i, err)
		}
		if werr != nil && err == nil {
			t.Fatalf("flip at %d: decoder refuses (%v), zstdran accepts", i, werr)
		}
		if err != nil {
			refused++
		}
	}
	if refused < len(l.z)*9/10 {
		t.Errorf("only %d of %d flips refused", refused, len(l.z))
	}
	cases := map[string][]byte{
		"not zstd":           []byte("hello, world"),
		"garbage after":      append(append([]byte{}, l.z...), "garbage!"...),
		"one byte after":     append(append([]byte{}, l.z...), 0),
		"zeros after":        append(append([]byte{}, l.z...), 0, 0, 0, 0),
		"short skippable":    append(append([]byte{}, l.z...), skippable(0, []byte("abc"))[:9]...),
		"reserved block":     {0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x03, 0x07, 0x00, 0x00}, // single segment, 3 bytes
		"window too large":   {0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x90, 0x01, 0x00, 0x00}, // window log 28
		"unknown dictionary": {0x28, 0xb5, 0x2f, 0xfd, 0x01, 0x50, 0x07, 0x01, 0x00, 0x00},
	}
	for name, z := range cases {
		if _, err := readAll(t, name, z); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	// The walk's own errors say what is wrong (the decoder would refuse
	// these too, less clearly).
	for name, msg := range map[string]string{"not zstd": "not a zstd frame", "garbage after": "not a zstd frame", "reserved block": "reserved block type"} {
		if _, err := readAll(t, name, cases[name]); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: %v, want %q", name, err, msg)
		}
	}
	x := NewIndexer(iotest.ErrReader(errors.New("disk on fire")), 0)
	if _, err := io.ReadAll(x); err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Errorf("source error: %v", err)
	}
	x = NewIndexer(io.MultiReader(bytes.NewReader(l.z[:100]), iotest.ErrReader(errors.ErrUnsupported)), 0)
	if _, err := io.ReadAll(x); !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), "offset 0:") {
		t.Errorf("source error in a frame: %v", err)
	}
}

func TestIndexerLifecycle(t *testing.T) {
	l := mixed(t)
	x := NewIndexer(bytes.NewReader(l.z), 0)
	if _, err := x.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	if _, err := x.Index(); err == nil {
		t.Error("index of a half-read stream")
	}
	x.Close()
	if _, err := x.Read(make([]byte, 10)); err == nil {
		t.Error("read after Close")
	}
	x.Close()
	_, x = index(t, l.z, l.data, 0, func(r io.Reader) io.Reader { return r })
	x.Close() // after the end: the index stays
	if _, err := x.Index(); err != nil {
		t.Error(err)
	}
}

// A stream that is not the one indexed is an error, not bytes at the
// wrong offsets.
func TestNewReaderMismatch(t *testing.T) {
	l := mixed(t)
	idx, _ := index(t, l.z, l.data, 128<<10, func(r io.Reader) io.Reader { return r })
	if _, err := idx.NewReader(len(idx.Checkpoints), bytes.NewReader(l.z)); err == nil {
		t.Error("checkpoint out of range accepted")
	}
	if _, err := idx.NewReader(-1, bytes.NewReader(l.z)); err == nil {
		t.Error("checkpoint -1 accepted")
	}
	// A frame more at checkpoint 2: checkpoint 3 is not where the index
	// says, which is seen there, not only at the end.
	extra := encoder(t).EncodeAll([]byte("an extra frame"), nil)
	c := idx.Checkpoints[2]
	z := append(append([]byte{}, extra...), l.z[c.In:]...)
	r, _ := idx.NewReader(2, bytes.NewReader(z))
	if _, err := io.ReadAll(r); err == nil || !strings.Contains(err.Error(), "where the index has checkpoint 3") {
		t.Errorf("a frame more: %v", err)
	}
	// A frame more at the end.
	r, _ = idx.NewReader(len(idx.Checkpoints)-1, bytes.NewReader(append(l.z[idx.Checkpoints[len(idx.Checkpoints)-1].In:], extra...)))
	if _, err := io.ReadAll(r); err == nil || !strings.Contains(err.Error(), "does not match its index") {
		t.Errorf("a frame more at the end: %v", err)
	}
	// Not a frame start.
	r, _ = idx.NewReader(1, bytes.NewReader(l.z[idx.Checkpoints[1].In+1:]))
	if _, err := io.ReadAll(r); err == nil {
		t.Error("read from the middle of a frame")
	}
}

func TestUnmarshalRejects(t *testing.T) {
	l := mixed(t)
	idx, _ := index(t, l.z, l.data, 64<<10, func(r io.Reader) io.Reader { return r })
	b, _ := idx.MarshalBinary()
	for i := range len(b) {
		var x Index
		if err := x.UnmarshalBinary(b[:i]); err == nil {
			t.Fatalf("prefix of %d of %d bytes accepted", i, len(b))
		}
	}
	var x Index
	if err := x.UnmarshalBinary(append(b, 0)); err == nil {
		t.Error("trailing byte accepted")
	}
	enc := func(cps []Checkpoint, h ...int64) []byte {
		i := Index{Span: h[0], CompressedSize: h[1], UncompressedSize: h[2], Frames: int(h[3]), Checkpoints: cps}
		b, _ := i.MarshalBinary()
		return b
	}
	two := []Checkpoint{{}, {In: 100, Out: 10}}
	good := enc(two, 10, 1000, 100, 2)
	if err := x.UnmarshalBinary(good); err != nil {
		t.Fatalf("a good index refused: %v", err)
	}
	bad := map[string][]byte{
		"span 0":                  enc(two, 0, 1000, 100, 2),
		"more checkpoints":        enc(two, 10, 1000, 100, 1),
		"frames that do not fit":  enc(two, 10, 1000, 100, 1000),
		"output without frames":   enc([]Checkpoint{{}}, 10, 1000, 100, 0),
		"first not at 0":          enc([]Checkpoint{{In: 1}}, 10, 1000, 100, 1),
		"closer than a span":      enc([]Checkpoint{{}, {In: 100, Out: 9}}, 10, 1000, 100, 2),
		"past the compressed end": enc([]Checkpoint{{}, {In: 1000, Out: 10}}, 10, 1000, 100, 2),
		"past the output":         enc([]Checkpoint{{}, {In: 100, Out: 101}}, 10, 1000, 100, 2),
		"no checkpoints":          enc(nil, 10, 1000, 100, 2),
		"wrong magic":             append([]byte("rafsgzi1"), good[8:]...),
		"huge count":              append(append([]byte(magic), 1, 0xff, 0xff, 0xff, 0xff, 0x7f, 0, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f), 0, 0),
	}
	for name, b := range bad {
		if err := x.UnmarshalBinary(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzIndexer(f *testing.F) {
	e := encoder(f)
	noCRC := encoder(f, zstd.WithEncoderCRC(false), zstd.WithWindowSize(1<<10), zstd.WithSingleSegment(false))
	var multi []byte
	for i := range 4 {
		multi = e.EncodeAll(text(uint64(i), 3000), multi)
		multi = append(multi, skippable(byte(i), []byte("s"))...)
		multi = noCRC.EncodeAll(bytes.Repeat([]byte{byte(i)}, 2000), multi)
	}
	f.Add(multi, uint16(1000))
	f.Add(e.EncodeAll(random(1, 300), nil), uint16(10))
	f.Add(streamed(f, text(2, 5000), zstd.WithEncoderLevel(zstd.SpeedBestCompression)), uint16(0))
	f.Add(encoder(f, zstd.WithZeroFrames(true)).EncodeAll(nil, nil), uint16(0))
	f.Add([]byte{}, uint16(0))
	ref := decoder(f)
	const limit = 8 << 20 // hostile RLE blocks expand 32768 times
	f.Fuzz(func(t *testing.T, z []byte, span uint16) {
		ref.Reset(bytes.NewReader(z))
		want, werr := io.ReadAll(io.LimitReader(ref, limit+1))
		x := NewIndexer(bytes.NewReader(z), int64(span)+1)
		defer x.Close()
		got, err := io.ReadAll(io.LimitReader(x, limit+1))
		if len(want) > limit {
			if !bytes.Equal(got, want) {
				t.Fatalf("the first %d bytes of output differ from the decoder's", limit)
			}
			return
		}
		if werr != nil {
			if err == nil {
				t.Fatalf("decoder refuses (%v), zstdran accepts", werr)
			}
			return
		}
		if err != nil {
			t.Fatalf("decoder accepts, zstdran: %v", err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("output differs from the decoder's")
		}
		idx, err := x.Index()
		if err != nil {
			t.Fatal(err)
		}
		checkResume(t, idx, z, want, 4)
	})
}

func FuzzUnmarshal(f *testing.F) {
	var l layer
	e := encoder(f)
	for i := range 5 {
		d := text(uint64(i), 2000)
		l.add(f, e.EncodeAll(d, nil), d)
	}
	x := NewIndexer(bytes.NewReader(l.z), 1500)
	io.Copy(io.Discard, x)
	idx, err := x.Index()
	if err != nil {
		f.Fatal(err)
	}
	b, _ := idx.MarshalBinary()
	f.Add(b)
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		var x Index
		if x.UnmarshalBinary(b) != nil {
			return
		}
		// What is accepted is self-consistent, and encodes to an index
		// that reads back the same.
		b2, _ := x.MarshalBinary()
		var y Index
		if err := y.UnmarshalBinary(b2); err != nil || !reflect.DeepEqual(x, y) {
			t.Fatalf("round trip: %v", err)
		}
		if x.Find(x.UncompressedSize) != len(x.Checkpoints)-1 || x.Find(0) != 0 {
			t.Fatalf("Find out of place")
		}
	})
}
