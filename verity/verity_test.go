package verity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
)

// TestStreamingEqualsBuild feeds the data in ragged pieces, through Write
// and through ReadFrom, and wants the same tree as Build, for sizes around
// batch and level boundaries.
func TestStreamingEqualsBuild(t *testing.T) {
	for _, c := range []struct {
		dbs    int
		blocks uint64
		salt   []byte
		compat Compat
	}{
		{4096, 1, nil, Standard},
		{512, 129, []byte{1, 2, 3}, Standard},
		{512, 128*128 + 1, nil, NydusCompat},
		{4096, 2*batchTarget/4096 + 129, nil, Standard}, // several batches, partial last one
		{512, 9*batchTarget/512 + 1, []byte("salt"), Standard},
		{65536, 200, nil, Standard}, // batches smaller than what a level-1 block covers
	} {
		t.Run(fmt.Sprintf("dbs=%d/blocks=%d/salt=%d/%v", c.dbs, c.blocks, len(c.salt), c.compat), func(t *testing.T) {
			p := Params{Algorithm: "sha256", DataBlockSize: c.dbs, HashBlockSize: 4096, DataBlocks: c.blocks, Salt: c.salt, Compat: c.compat}
			data := randomBytes(c.blocks, int(p.DataSize()))
			want := buildInMemory(t, p, data)

			rng := rand.New(rand.NewPCG(c.blocks, 1))
			b, err := NewBuilder(p, nil)
			if err != nil {
				t.Fatal(err)
			}
			for rest := data; len(rest) > 0; {
				n := min(len(rest), 1+rng.IntN(3*c.dbs+100))
				if rng.IntN(50) == 0 {
					n = min(len(rest), 5<<20) // now and then more than a batch at once
				}
				if w, err := b.Write(rest[:n]); err != nil || w != n {
					t.Fatalf("Write: %d, %v", w, err)
				}
				rest = rest[n:]
			}
			got, err := b.Finish()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Root, want.Root) || !bytes.Equal(got.HashArea, want.HashArea) {
				t.Fatalf("Write in pieces: root %x, Build: %x", got.Root, want.Root)
			}

			b, err = NewBuilder(p, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(b, &raggedReader{data: data, rng: rng}); err != nil {
				t.Fatal(err)
			}
			got, err = b.Finish()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Root, want.Root) || !bytes.Equal(got.HashArea, want.HashArea) {
				t.Fatalf("ReadFrom: root %x, Build: %x", got.Root, want.Root)
			}

			// The same tree written through a WriterAt, at an offset.
			p.HashOffset = 8192
			var out writerAtBuffer
			b, err = NewBuilder(p, &out)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := b.Write(data); err != nil {
				t.Fatal(err)
			}
			got, err = b.Finish()
			if err != nil {
				t.Fatal(err)
			}
			if got.HashArea != nil || !bytes.Equal(got.Root, want.Root) {
				t.Fatalf("WriterAt: root %x, HashArea kept: %v", got.Root, got.HashArea != nil)
			}
			if len(want.HashArea) == 0 {
				if len(out.buf) != 0 {
					t.Fatalf("WriterAt: %d bytes written for a tree without hash blocks", len(out.buf))
				}
				return
			}
			if len(out.buf) != 8192+len(want.HashArea) || !bytes.Equal(out.buf[8192:], want.HashArea) || bytes.Count(out.buf[:8192], []byte{0}) != 8192 {
				t.Fatalf("WriterAt: %d bytes written, want the hash area at 8192", len(out.buf))
			}
		})
	}
}

// raggedReader returns short reads of random sizes.
type raggedReader struct {
	data []byte
	rng  *rand.Rand
}

func (r *raggedReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 1+r.rng.IntN(70000))], r.data)
	r.data = r.data[n:]
	return n, nil
}

type writerAtBuffer struct{ buf []byte }

func (w *writerAtBuffer) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(w.buf) {
		w.buf = append(w.buf, make([]byte, end-len(w.buf))...)
	}
	return copy(w.buf[off:], p), nil
}

func TestBuilderRejectsWrongAmounts(t *testing.T) {
	p := Params{Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 10}

	b, _ := NewBuilder(p, nil)
	if _, err := b.Write(make([]byte, 10*4096+1)); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Errorf("too much data: %v", err)
	}
	if _, err := b.Finish(); err == nil {
		t.Errorf("Finish after a failed Write succeeded")
	}

	b, _ = NewBuilder(p, nil)
	b.Write(make([]byte, 10*4096-1))
	if _, err := b.Finish(); err == nil || !strings.Contains(err.Error(), "got 40959 of the 40960") {
		t.Errorf("short data: %v", err)
	}

	b, _ = NewBuilder(p, nil)
	if _, err := b.ReadFrom(bytes.NewReader(make([]byte, 10*4096+1))); err == nil || !strings.Contains(err.Error(), "longer") {
		t.Errorf("ReadFrom of too much data: %v", err)
	}
	b.Close()

	if _, err := Build(context.Background(), bytes.NewReader(make([]byte, 4096)), p, nil); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("Build of short data: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Build(ctx, bytes.NewReader(make([]byte, 10*4096)), p, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Build with a cancelled context: %v", err)
	}

	b, _ = NewBuilder(p, nil)
	b.Write(make([]byte, 10*4096))
	if _, err := b.Finish(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Write([]byte{0}); err == nil {
		t.Errorf("Write after Finish succeeded")
	}
}

func TestWriterAtErrorsSurface(t *testing.T) {
	p := Params{Algorithm: "sha256", DataBlockSize: 512, HashBlockSize: 4096, DataBlocks: 100000}
	_, err := Build(context.Background(), bytes.NewReader(make([]byte, p.DataSize())), p, failingWriterAt{})
	if err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Build into a failing WriterAt: %v", err)
	}
}

type failingWriterAt struct{}

func (failingWriterAt) WriteAt([]byte, int64) (int, error) { return 0, errors.New("disk full") }

func TestValidate(t *testing.T) {
	good := Params{Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 1}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		mutate func(*Params)
		want   string
	}{
		{func(p *Params) { p.Algorithm = "md5" }, "unsupported hash"},
		{func(p *Params) { p.Algorithm = "" }, "unsupported hash"},
		{func(p *Params) { p.DataBlockSize = 1000 }, "data block size 1000"},
		{func(p *Params) { p.DataBlockSize = 256 }, "data block size 256"},
		{func(p *Params) { p.HashBlockSize = 128 << 10 }, "hash block size"},
		{func(p *Params) { p.DataBlocks = 0 }, "no data blocks"},
		{func(p *Params) { p.DataBlocks = 1 << 62 }, "overflow"},
		{func(p *Params) { p.HashOffset = 512 }, "not a multiple"},
		{func(p *Params) { p.Salt = make([]byte, 257) }, "salt"},
		{func(p *Params) { p.Compat = NydusCompat; p.Salt = []byte{1} }, "nydus"},
		{func(p *Params) { p.Compat = NydusCompat; p.Algorithm = "sha512" }, "nydus"},
		{func(p *Params) { p.Compat = 7 }, "compat"},
		{func(p *Params) { p.HashBlockSize = 4095 }, "hash block size 4095"},
	} {
		p := good
		c.mutate(&p)
		err := p.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want an error mentioning %q", p, err, c.want)
		}
		if _, err := NewBuilder(p, nil); err == nil {
			t.Errorf("%+v: NewBuilder accepted it", p)
		}
	}
	if err := NydusParams(4097, 4096).Validate(); err == nil {
		t.Errorf("NydusParams of a partial block validated")
	}
}

func TestLayout(t *testing.T) {
	// Shapes from nydus' MerkleTree tests and veritysetup's level rules.
	for _, c := range []struct {
		blocks uint64
		levels []uint64 // hash blocks per level, level 1 first
	}{
		{1, nil}, {2, []uint64{1}}, {128, []uint64{1}}, {129, []uint64{2, 1}},
		{128 * 128, []uint64{128, 1}}, {128*128 + 1, []uint64{129, 2, 1}},
	} {
		p := Params{Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: c.blocks}
		l := newLayout(p, 32)
		if fmt.Sprint(l.levelBlocks) != fmt.Sprint(c.levels) {
			t.Errorf("%d blocks: levels %v, want %v", c.blocks, l.levelBlocks, c.levels)
		}
		var sum uint64
		for _, n := range c.levels {
			sum += n
		}
		if p.HashBlocks() != sum || l.size != sum*4096 {
			t.Errorf("%d blocks: %d hash blocks, want %d", c.blocks, p.HashBlocks(), sum)
		}
		// Top level first.
		for i := 1; i < len(l.levelStart); i++ {
			if l.levelStart[i] >= l.levelStart[i-1] {
				t.Errorf("%d blocks: level %d starts at %d, not before level %d at %d", c.blocks, i+1, l.levelStart[i], i, l.levelStart[i-1])
			}
		}
	}
}

func TestOptionsLineSalt(t *testing.T) {
	p := Params{Algorithm: "sha256", DataBlockSize: 512, HashBlockSize: 4096, DataBlocks: 8, HashOffset: 4096, Salt: []byte{0xab, 0x01}}
	want := "dm-verity options: --no-superblock --format=1 -s ab01 --hash=sha256 --data-block-size=512 --hash-block-size=4096 --data-blocks 8 --hash-offset 4096 00ff"
	if got := p.OptionsLine([]byte{0, 0xff}); got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}

func TestVerifyWrongRoot(t *testing.T) {
	p := Params{Algorithm: "sha256", DataBlockSize: 512, HashBlockSize: 4096, DataBlocks: 300}
	data := randomBytes(5, int(p.DataSize()))
	tree := buildInMemory(t, p, data)
	root := bytes.Clone(tree.Root)
	root[0] ^= 1
	var ce *CorruptionError
	err := Verify(context.Background(), bytes.NewReader(data), bytes.NewReader(tree.HashArea), p, root)
	if !errors.As(err, &ce) || ce.Kind != BadRoot {
		t.Fatalf("wrong root: %v", err)
	}
	if err := Verify(context.Background(), bytes.NewReader(data), bytes.NewReader(tree.HashArea[:4096]), p, tree.Root); err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated hash area: %v", err)
	}
	if err := Verify(context.Background(), bytes.NewReader(data[:1000]), bytes.NewReader(tree.HashArea), p, tree.Root); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated data: %v", err)
	}
	if err := Verify(context.Background(), bytes.NewReader(data), bytes.NewReader(tree.HashArea), p, root[:5]); err == nil {
		t.Fatalf("short root accepted")
	}
}

// TestBuildReadErrors: Build reads batches on several goroutines at once;
// the first failure in data order is the one reported, with its offset,
// and nothing is left running.
func TestBuildReadErrors(t *testing.T) {
	p := Params{Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 9 * batchTarget / 4096}
	data := randomBytes(5, int(p.DataSize()))
	cause := errors.New("medium error")
	failAt := int64(3*batchTarget + 5*4096 + 17)
	_, err := Build(context.Background(), &failingReaderAt{data: data, from: failAt, err: cause}, p, nil)
	// Reads are of readPiece bytes, and the one that fails is named.
	if !errors.Is(err, cause) || !strings.Contains(err.Error(), fmt.Sprintf("at %d:", failAt&^(readPiece-1))) {
		t.Errorf("read error at %d: %v", failAt, err)
	}

	// Data that ends inside a later batch.
	short := data[:5*batchTarget+4096+100]
	_, err = Build(context.Background(), bytes.NewReader(short), p, nil)
	if !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), fmt.Sprintf("data ends after %d of %d bytes", len(short), p.DataSize())) {
		t.Errorf("short data: %v", err)
	}
}

// failingReaderAt serves data but fails every read that reaches from.
type failingReaderAt struct {
	data []byte
	from int64
	err  error
}

func (r *failingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > r.from {
		return 0, r.err
	}
	return copy(p, r.data[off:]), nil
}

func TestBuildProgress(t *testing.T) {
	p := Params{Algorithm: "sha256", DataBlockSize: 512, HashBlockSize: 4096, DataBlocks: 5*batchTarget/512 + 3}
	var reports []int64
	_, err := Build(context.Background(), bytes.NewReader(make([]byte, p.DataSize())), p, nil,
		WithProgress(func(done int64) { reports = append(reports, done) }))
	if err != nil {
		t.Fatal(err)
	}
	if len(reports) != 6 || reports[len(reports)-1] != int64(p.DataSize()) {
		t.Fatalf("progress reports %v, want 6 ending at %d", reports, p.DataSize())
	}
	for i := 1; i < len(reports); i++ {
		if reports[i] <= reports[i-1] {
			t.Fatalf("progress went back: %v", reports)
		}
	}
}
