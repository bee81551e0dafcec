package verity

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/rafsnbd/rafsnbd/internal/readat"
)

// Reader checks every read of the data against a hash tree before it
// returns it, as dm-verity does in the kernel: a device read through a
// Reader either returns the bytes the root hash vouches for, or a
// *CorruptionError (BadDataBlock). It is for hosts without device-mapper.
//
// The whole tree is loaded and checked against the root once, in
// NewReader (it is 1/128 of the data for sha256 and 4 KiB data blocks);
// afterwards each read hashes the data blocks it touches and compares them
// with their level-1 digests. Data is re-hashed on every read, never
// remembered as good: the bytes under it (a cache file) may change.
type Reader struct {
	data    io.ReaderAt
	ctxData interface {
		ReadAtContext(context.Context, []byte, int64) (int, error)
	}
	p        Params
	lay      layout
	level1   []byte // the level-1 hash blocks: one digest slot per data block
	rootOnly []byte // with a single data block: the root is its digest
	root     []byte
	bufs     sync.Pool
}

// NewReader checks the tree in hash (stored at p.HashOffset) against root
// and returns a Reader over data. Reads of data that has a
// ReadAtContext method get the caller's context.
func NewReader(data, hash io.ReaderAt, p Params, root []byte) (*Reader, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if len(root) != p.DigestSize() {
		return nil, fmt.Errorf("verity: root hash has %d bytes, %s digests have %d", len(root), p.Algorithm, p.DigestSize())
	}
	lay := newLayout(p, p.DigestSize())
	if lay.size > uint64(maxInt) {
		return nil, fmt.Errorf("verity: a %d-byte tree does not fit in memory", lay.size)
	}
	area := make([]byte, lay.size)
	if _, err := readat.Full(hash, area, int64(p.HashOffset)); err != nil {
		return nil, fmt.Errorf("verity: reading the hash tree: %w", err)
	}
	return newReader(data, area, p, root)
}

// NewTreeReader is NewReader for a tree already in memory (Tree.HashArea
// of a Build without output).
func NewTreeReader(data io.ReaderAt, t *Tree) (*Reader, error) {
	if t.HashArea == nil && t.Params.DataBlocks > 1 {
		return nil, fmt.Errorf("verity: the tree was written out, not kept in memory")
	}
	return newReader(data, t.HashArea, t.Params, t.Root)
}

func newReader(data io.ReaderAt, area []byte, p Params, root []byte) (*Reader, error) {
	p.Salt = append([]byte(nil), p.Salt...)
	r := &Reader{data: data, p: p, lay: newLayout(p, p.DigestSize()), root: bytes.Clone(root)}
	if c, ok := data.(interface {
		ReadAtContext(context.Context, []byte, int64) (int, error)
	}); ok {
		r.ctxData = c
	}
	if uint64(len(area)) != r.lay.size {
		return nil, fmt.Errorf("verity: hash area has %d bytes, the parameters need %d", len(area), r.lay.size)
	}
	if r.lay.levels == 0 {
		r.rootOnly = bytes.Clone(root)
		return r, nil
	}
	h := r.hasher()
	digest := make([]byte, p.DigestSize())
	hb := uint64(p.HashBlockSize)
	// The top level is one block, checked against the root; every lower
	// block against its slot one level up.
	top := r.lay.levels - 1
	start := r.lay.levelStart[top] * hb
	h.sum(digest, area[start:start+hb])
	if !bytes.Equal(digest, root) {
		return nil, &CorruptionError{Kind: BadRoot}
	}
	for lvl := top - 1; lvl >= 0; lvl-- {
		up := area[r.lay.levelStart[lvl+1]*hb:]
		for j := uint64(0); j < r.lay.levelBlocks[lvl]; j++ {
			off := (r.lay.levelStart[lvl] + j) * hb
			h.sum(digest, area[off:off+hb])
			if !bytes.Equal(digest, r.slot(up, j)) {
				return nil, &CorruptionError{Kind: BadHashBlock, Offset: p.HashOffset + off}
			}
		}
	}
	r.level1 = area[r.lay.levelStart[0]*hb : (r.lay.levelStart[0]+r.lay.levelBlocks[0])*hb]
	return r, nil
}

// slot is the digest of entry j of a level whose blocks start at level.
func (r *Reader) slot(level []byte, j uint64) []byte {
	per := uint64(r.lay.perBlock)
	off := (j/per)*uint64(r.p.HashBlockSize) + (j%per)*uint64(r.lay.slot)
	return level[off : off+uint64(r.lay.digestSize)]
}

func (r *Reader) hasher() blockHasher {
	alg, _ := lookupAlgorithm(r.p.Algorithm)
	return blockHasher{h: alg.newHash(), salt: r.p.Salt, sha: r.p.Algorithm == "sha256" && len(r.p.Salt) == 0}
}

// RootHash is the root hash the tree was checked against.
func (r *Reader) RootHash() []byte { return bytes.Clone(r.root) }

// Size is the size of the verified data.
func (r *Reader) Size() int64 { return int64(r.p.DataSize()) }

// BlockSize is the data block size.
func (r *Reader) BlockSize() int { return r.p.DataBlockSize }

// ReadAt reads verified data.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	return r.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads the data blocks covering [off, off+len(p)), checks
// each against its digest, and copies the requested bytes. Reads beyond
// the data fail with io.EOF after the bytes before it.
func (r *Reader) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	size := r.Size()
	if off < 0 {
		return 0, fmt.Errorf("verity: negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	want, short := p, false
	if rest := size - off; int64(len(want)) > rest {
		want, short = want[:rest], true
	}
	bs := int64(r.p.DataBlockSize)
	first := off / bs
	end := (off + int64(len(want)) + bs - 1) / bs
	buf := want
	aligned := off%bs == 0 && int64(len(want))%bs == 0
	if !aligned {
		n := int((end - first) * bs)
		bp, _ := r.bufs.Get().(*[]byte)
		if bp == nil || cap(*bp) < n {
			b := make([]byte, n)
			bp = &b
		}
		defer r.bufs.Put(bp)
		buf = (*bp)[:n]
	}
	if err := r.readData(ctx, buf, first*bs); err != nil {
		return 0, err
	}
	if err := r.check(buf, uint64(first)); err != nil {
		return 0, err
	}
	if !aligned {
		copy(want, buf[off-first*bs:])
	}
	if short {
		return len(want), io.EOF
	}
	return len(want), nil
}

func (r *Reader) readData(ctx context.Context, buf []byte, off int64) error {
	var n int
	var err error
	if r.ctxData != nil {
		n, err = r.ctxData.ReadAtContext(ctx, buf, off)
	} else {
		n, err = readat.Full(r.data, buf, off)
	}
	if n == len(buf) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// check compares whole data blocks, the first of them block number first,
// with their digests.
func (r *Reader) check(buf []byte, first uint64) error {
	h := r.hasher()
	digest := make([]byte, r.p.DigestSize())
	bs := r.p.DataBlockSize
	for i := 0; i < len(buf); i += bs {
		blk := first + uint64(i/bs)
		h.sum(digest, buf[i:i+bs])
		var want []byte
		if r.rootOnly != nil {
			want = r.rootOnly
		} else {
			want = r.slot(r.level1, blk)
		}
		if !bytes.Equal(digest, want) {
			return &CorruptionError{Kind: BadDataBlock, Offset: blk * uint64(bs)}
		}
	}
	return nil
}
