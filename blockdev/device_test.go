package blockdev

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// A device built from random extents must read exactly like the same bytes
// laid out in one buffer, for every offset and length, holes included.
func TestComposedMatchesFlatBuffer(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for round := 0; round < 50; round++ {
		size := int64(rng.IntN(1<<16) + 1)
		flat := make([]byte, size)
		var extents []Extent
		for pos := int64(0); pos < size; {
			pos += int64(rng.IntN(3000)) // hole
			if pos >= size {
				break
			}
			n := int64(rng.IntN(5000) + 1)
			if n > size-pos {
				n = size - pos
			}
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(rng.Uint32() | 1) // never zero, so holes are visible
			}
			copy(flat[pos:], data)
			extents = append(extents, Extent{Name: "x", Offset: pos, Length: n, Source: bytes.NewReader(data)})
			pos += n
		}
		rng.Shuffle(len(extents), func(i, j int) { extents[i], extents[j] = extents[j], extents[i] })
		dev, err := New(size, 512, extents)
		if err != nil {
			t.Fatal(err)
		}
		for k := 0; k < 200; k++ {
			off := rng.Int64N(size)
			n := rng.Int64N(size - off + 1)
			got := make([]byte, n)
			if _, err := dev.ReadAt(got, off); err != nil {
				t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
			}
			if !bytes.Equal(got, flat[off:off+n]) {
				t.Fatalf("round %d: ReadAt(%d, %d) differs from flat layout", round, off, n)
			}
		}
	}
}

func TestComposedRejectsOutOfRange(t *testing.T) {
	dev, err := New(4096, 512, []Extent{{Name: "a", Offset: 0, Length: 4096, Source: bytes.NewReader(make([]byte, 4096))}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, n int64 }{{4096, 1}, {4095, 2}, {-1, 1}, {1 << 62, 512}} {
		if n, err := dev.ReadAt(make([]byte, c.n), c.off); !errors.Is(err, ErrOutOfRange) || n != 0 {
			t.Errorf("ReadAt(off %d, len %d) = %d, %v; want 0, ErrOutOfRange", c.off, c.n, n, err)
		}
	}
}

func TestNewRejectsBadLayouts(t *testing.T) {
	src := bytes.NewReader(make([]byte, 100))
	for name, ext := range map[string][]Extent{
		"overlap": {{Name: "a", Offset: 0, Length: 100, Source: src}, {Name: "b", Offset: 50, Length: 10, Source: src}},
		"outside": {{Name: "a", Offset: 4000, Length: 200, Source: src}},
		"nosrc":   {{Name: "a", Offset: 0, Length: 10}},
	} {
		if _, err := New(4096, 512, ext); err == nil {
			t.Errorf("%s: New accepted the layout", name)
		}
	}
}

// A source that returns fewer bytes than asked must fail the read, never
// leave zeros in the caller's buffer as if they were data.
func TestComposedShortSourceIsAnError(t *testing.T) {
	dev, err := New(1024, 512, []Extent{{Name: "short", Offset: 0, Length: 1024, Source: bytes.NewReader(make([]byte, 1000))}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dev.ReadAt(make([]byte, 1024), 0); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("err = %v, want io.ErrUnexpectedEOF", err)
	}
}
