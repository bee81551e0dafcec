package verity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
)

// CorruptionKind says what Verify found wrong.
type CorruptionKind int

const (
	// BadDataBlock: a data block does not match its level-1 digest.
	BadDataBlock CorruptionKind = iota + 1
	// BadHashBlock: a hash block does not match its digest one level up.
	BadHashBlock
	// BadSpareArea: unused digest space of a hash block holds the wrong
	// bytes (not zeros in Standard mode, not the nydus fill digest in
	// NydusCompat mode).
	BadSpareArea
	// BadRoot: the top hash block (or the single data block) does not
	// match the root hash.
	BadRoot
)

// CorruptionError reports the first problem Verify found, in the order
// veritysetup checks: data blocks against level 1, then each level against
// the next, then the root.
type CorruptionError struct {
	Kind CorruptionKind
	// Offset is the byte offset of the bad block (or of the start of the
	// bad spare area): in the data for BadDataBlock, in the hash device
	// (counting Params.HashOffset) for BadHashBlock and BadSpareArea.
	Offset uint64
}

func (e *CorruptionError) Error() string {
	switch e.Kind {
	case BadDataBlock:
		return fmt.Sprintf("verity: data block at offset %d does not match its digest", e.Offset)
	case BadHashBlock:
		return fmt.Sprintf("verity: hash block at offset %d does not match its digest", e.Offset)
	case BadSpareArea:
		return fmt.Sprintf("verity: spare area at hash offset %d is not filled as expected", e.Offset)
	case BadRoot:
		return "verity: root hash does not match"
	}
	return "verity: corrupt"
}

// Verify checks data and the tree stored in hash (at p.HashOffset) against
// root, reading the data once. It returns a *CorruptionError for the first
// bad block, other errors for I/O problems and bad parameters.
func Verify(ctx context.Context, data, hash io.ReaderAt, p Params, root []byte, opts ...Option) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if len(root) != p.DigestSize() {
		return fmt.Errorf("verity: root hash has %d bytes, %s digests have %d", len(root), p.Algorithm, p.DigestSize())
	}
	cmp := &compareSink{r: hash, p: p, lay: newLayout(p, p.DigestSize())}
	b, err := newBuilder(p, cmp)
	if err != nil {
		return err
	}
	for _, o := range opts {
		o(b)
	}
	tree, err := b.build(ctx, data)
	if bad := cmp.first(); bad != nil {
		// A data mismatch stops the build early; anything found before
		// that (all of it in lower or equal levels) still ranks first.
		return bad
	}
	if err != nil {
		return err
	}
	if !bytes.Equal(tree.Root, root) {
		return &CorruptionError{Kind: BadRoot}
	}
	return nil
}

// errDataMismatch stops a verifying build at the first bad data block:
// nothing found later can rank before it.
var errDataMismatch = errors.New("verity: data mismatch")

// compareSink checks each hash block the builder computes against the
// stored one, remembering the first mismatch found at each level.
type compareSink struct {
	r       io.ReaderAt
	p       Params
	lay     layout
	scratch []byte
	bad     []*CorruptionError // per level, index 0 = level 1
}

func (c *compareSink) first() error {
	for _, e := range c.bad {
		if e != nil {
			return e
		}
	}
	return nil
}

func (c *compareSink) put(off uint64, computed []byte) error {
	if cap(c.scratch) < len(computed) {
		c.scratch = make([]byte, len(computed))
	}
	stored := c.scratch[:len(computed)]
	pos := c.p.HashOffset + off
	if _, err := c.r.ReadAt(stored, int64(pos)); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("verity: reading hash blocks at %d: %w", pos, err)
	}
	if bytes.Equal(stored, computed) {
		return nil
	}
	hbs := uint64(c.p.HashBlockSize)
	i := firstDifference(stored, computed)
	block := (off + uint64(i)) / hbs // hash block number in the hash area
	inBlock := int((off + uint64(i)) % hbs)
	level := c.levelOf(block)
	if c.bad == nil {
		c.bad = make([]*CorruptionError, c.lay.levels)
	}
	if c.bad[level] != nil {
		return nil // an earlier block of this level is already reported
	}
	slot := inBlock / c.lay.slot
	entry := (block-c.lay.levelStart[level])*uint64(c.lay.perBlock) + uint64(slot)
	used := int(min(c.lay.entries(&c.p, level)-(block-c.lay.levelStart[level])*uint64(c.lay.perBlock), uint64(c.lay.perBlock)))
	blockStart := c.p.HashOffset + block*hbs
	switch {
	case slot >= used:
		c.bad[level] = &CorruptionError{Kind: BadSpareArea, Offset: blockStart + uint64(used*c.lay.slot)}
	case inBlock%c.lay.slot >= c.lay.digestSize:
		// Padding after a short digest (sha1): veritysetup checks it too.
		c.bad[level] = &CorruptionError{Kind: BadSpareArea, Offset: blockStart + uint64(inBlock-inBlock%c.lay.slot+c.lay.digestSize)}
	case level == 0:
		c.bad[level] = &CorruptionError{Kind: BadDataBlock, Offset: entry * uint64(c.p.DataBlockSize)}
		return errDataMismatch
	default:
		child := c.lay.levelStart[level-1] + entry
		c.bad[level] = &CorruptionError{Kind: BadHashBlock, Offset: c.p.HashOffset + child*hbs}
	}
	return nil
}

// levelOf returns the 0-based level holding hash block number block.
func (c *compareSink) levelOf(block uint64) int {
	for i := 0; i < c.lay.levels; i++ {
		if block >= c.lay.levelStart[i] && block < c.lay.levelStart[i]+c.lay.levelBlocks[i] {
			return i
		}
	}
	return c.lay.levels - 1 // unreachable for blocks the builder writes
}

func firstDifference(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}
