package gzran

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"testing/iotest"

	kgzip "github.com/klauspost/compress/gzip"
)

// testData is compressible but varied: text-like runs, repeats at all
// distances, and random bytes (stored blocks at low levels).
func testData(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	words := []string{"usr", "lib", "share", "locale", "the ", "and ", "\x00\x00\x00\x00", "GNU ", "x86_64", "\n"}
	var b []byte
	for len(b) < n {
		switch r.IntN(4) {
		case 0:
			for range r.IntN(200) {
				b = append(b, words[r.IntN(len(words))]...)
			}
		case 1:
			if len(b) > 0 {
				d := 1 + r.IntN(min(len(b), 40000))
				l := r.IntN(600)
				for range l {
					b = append(b, b[len(b)-d])
				}
			}
		case 2:
			for range r.IntN(3000) {
				b = append(b, byte(r.Uint32()))
			}
		default:
			b = append(b, bytes.Repeat([]byte{byte(r.Uint32())}, r.IntN(1000))...)
		}
	}
	return b[:n]
}

func gz(t testing.TB, data []byte, level int) []byte {
	var buf bytes.Buffer
	w, err := gzip.NewWriterLevel(&buf, level)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	w.Close()
	return buf.Bytes()
}

// index inflates z fully through an Indexer, checking the output.
func index(t testing.TB, z, want []byte, span int64, r func(io.Reader) io.Reader) *Index {
	t.Helper()
	x := NewIndexer(r(bytes.NewReader(z)), span)
	got, err := io.ReadAll(x)
	if err != nil {
		t.Fatalf("inflate: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("inflate: %d bytes differ from the %d expected", len(got), len(want))
	}
	idx, err := x.Index()
	if err != nil {
		t.Fatal(err)
	}
	if idx.CompressedSize != int64(len(z)) || idx.UncompressedSize != int64(len(want)) {
		t.Fatalf("sizes %d/%d, want %d/%d", idx.CompressedSize, idx.UncompressedSize, len(z), len(want))
	}
	return idx
}

// checkResume reads from every checkpoint (at most limit of them, spread
// out, when limit > 0) to the end and compares.
func checkResume(t testing.TB, idx *Index, z, want []byte, limit int) {
	t.Helper()
	b, _ := idx.MarshalBinary()
	windows := idx.Windows()
	var back Index
	if err := back.UnmarshalBinary(b); err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	if back.WindowsSize() != int64(len(windows)) {
		t.Fatalf("table says %d bytes of windows, there are %d", back.WindowsSize(), len(windows))
	}
	step := 1
	if limit > 0 && len(back.Checkpoints) > limit {
		step = (len(back.Checkpoints) + limit - 1) / limit
	}
	for i := 0; i < len(back.Checkpoints); i += step {
		c := back.Checkpoints[i]
		r, err := back.NewReader(i, windows[c.WindowAt:c.WindowAt+int64(c.WindowStored)], bytes.NewReader(z[c.In/8:]))
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
	data := testData(1, 3<<20)
	for _, level := range []int{gzip.NoCompression, gzip.BestSpeed, gzip.DefaultCompression, gzip.BestCompression, gzip.HuffmanOnly} {
		z := gz(t, data, level)
		for _, rd := range []func(io.Reader) io.Reader{func(r io.Reader) io.Reader { return r }, iotest.HalfReader} {
			idx := index(t, z, data, 256<<10, rd)
			if len(idx.Checkpoints) < 3 {
				t.Errorf("level %d: %d checkpoints in %d bytes at span 256 KiB", level, len(idx.Checkpoints), len(data))
			}
			checkResume(t, idx, z, data, 0)
		}
	}
}

// klauspost's encoder makes other block shapes (and its own stored blocks).
func TestKlauspostMultiMember(t *testing.T) {
	var z, want bytes.Buffer
	for i := range 4 {
		d := testData(uint64(10+i), (i+1)*300<<10)
		w, _ := kgzip.NewWriterLevel(&z, []int{1, 5, 9, -2}[i])
		w.Name = "member"
		w.Write(d)
		w.Close()
		want.Write(d)
	}
	idx := index(t, z.Bytes(), want.Bytes(), 200<<10, iotest.OneByteReader)
	checkResume(t, idx, z.Bytes(), want.Bytes(), 0)
}

func TestErrors(t *testing.T) {
	data := testData(2, 100<<10)
	z := gz(t, data, 6)
	cases := map[string][]byte{
		"empty":         nil,
		"truncated":     z[:len(z)/2],
		"no trailer":    z[:len(z)-8],
		"bad crc":       append(append([]byte{}, z[:len(z)-8]...), 1, 2, 3, 4, 5, 6, 7, 8),
		"garbage after": append(append([]byte{}, z...), 'x'),
		"not gzip":      []byte("hello, world"),
	}
	flipped := append([]byte{}, z...)
	flipped[len(z)/3] ^= 0x10
	cases["flipped bit"] = flipped
	for name, in := range cases {
		_, err := io.ReadAll(NewIndexer(bytes.NewReader(in), 0))
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	_, err := io.ReadAll(NewIndexer(bytes.NewReader(z[:len(z)-3]), 0))
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated trailer: %v, want unexpected EOF", err)
	}
	_, err = io.ReadAll(NewIndexer(iotest.ErrReader(errors.New("disk on fire")), 0))
	if err == nil || err.Error() != "disk on fire" {
		t.Errorf("source error: %v", err)
	}
}

// A window that is not the one the table names (another checkpoint's, a
// changed byte, a short read) is refused before inflation starts.
func TestWrongWindowRefused(t *testing.T) {
	data := testData(4, 1<<20)
	z := gz(t, data, 6)
	idx := index(t, z, data, 128<<10, func(r io.Reader) io.Reader { return r })
	if len(idx.Checkpoints) < 3 {
		t.Fatalf("%d checkpoints", len(idx.Checkpoints))
	}
	c := idx.Checkpoints[2]
	flipped := bytes.Clone(c.Window)
	flipped[len(flipped)/2] ^= 1
	for name, w := range map[string][]byte{"another checkpoint's": idx.Checkpoints[1].Window, "flipped": flipped,
		"short": c.Window[:len(c.Window)-1], "none": nil} {
		if _, err := idx.NewReader(2, w, bytes.NewReader(z[c.In/8:])); err == nil || !strings.Contains(err.Error(), "does not match the index") {
			t.Errorf("%s window: %v", name, err)
		}
	}
}

func TestUnmarshalRejects(t *testing.T) {
	data := testData(3, 1<<20)
	z := gz(t, data, 6)
	idx := index(t, z, data, 64<<10, func(r io.Reader) io.Reader { return r })
	b, _ := idx.MarshalBinary()
	for i := range len(b) {
		var x Index
		if err := x.UnmarshalBinary(b[:i]); err == nil {
			t.Fatalf("prefix of %d of %d bytes accepted", i, len(b))
		}
	}
}

// FuzzInflate checks the inflater against compress/gzip: both accept the
// same streams with the same output, or both refuse; and resuming at every
// checkpoint yields the rest of the output.
func FuzzInflate(f *testing.F) {
	for i, level := range []int{0, 1, 6, 9, -2} {
		d := testData(uint64(i), 4<<10)
		f.Add(gz(f, d, level), uint16(4096))
	}
	f.Add([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0}, uint16(1))
	f.Fuzz(func(t *testing.T, z []byte, span uint16) {
		zr, err := gzip.NewReader(bytes.NewReader(z))
		var want []byte
		if err == nil {
			want, err = io.ReadAll(zr)
		}
		x := NewIndexer(bytes.NewReader(z), int64(span)+1)
		got, gerr := io.ReadAll(x)
		if (err == nil) != (gerr == nil) {
			t.Fatalf("compress/gzip: %v; gzran: %v", err, gerr)
		}
		if err != nil {
			return
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("output differs from compress/gzip")
		}
		idx, err := x.Index()
		if err != nil {
			t.Fatal(err)
		}
		checkResume(t, idx, z, want, 4)
	})
}
