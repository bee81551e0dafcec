package verity

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// BuildInto is Build writing the tree into the file out (which may be the
// data's own file, for a tree appended to the data) so that a build that
// fails or is cancelled, or a process that is killed, leaves out as it
// was. Writing hash blocks into out as they are done, as Build does, would
// leave a file grown by part of a tree, which a second format then counts
// as data.
//
// For a regular file, the tree is built in a temporary beside out (an
// atomicfile temporary, which gc recognises if the process dies) and
// copied into out at p.HashOffset only when complete, in one step that the
// context does not interrupt; if that copy fails, out is cut back to its
// old size. (Bytes of out that the tree overwrites in place, below its old
// size, are not restored: the copy is the only moment they change.)
//
// Any other out (a block device, which cannot grow and whose hash area the
// caller chose) gets the hash blocks in place as Build writes them.
func BuildInto(ctx context.Context, data io.ReaderAt, p Params, out *os.File, opts ...Option) (*Tree, error) {
	st, err := out.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return Build(ctx, data, p, out, opts...)
	}
	tmp, err := atomicfile.CreateIn(filepath.Dir(out.Name()), filepath.Base(out.Name()))
	if err != nil {
		return nil, err
	}
	defer tmp.Abort() // never committed: the temporary only carries the tree
	// The tree goes at the start of the temporary: the same hash blocks,
	// without a hole of HashOffset bytes in front of them.
	b, err := newBuilder(p, writerAtSink{w: tmp, base: 0})
	if err != nil {
		return nil, err
	}
	for _, o := range opts {
		o(b)
	}
	tree, err := b.build(ctx, data)
	if err != nil {
		return nil, err
	}
	if err := copyTree(tmp.File, out, st.Size(), p); err != nil {
		return nil, err
	}
	return tree, nil
}

// copyTree copies the finished tree from the start of tmp into out at
// p.HashOffset, cutting out back to oldSize if it fails.
func copyTree(tmp, out *os.File, oldSize int64, p Params) error {
	size := int64(p.TreeSize())
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if _, err := out.Seek(int64(p.HashOffset), io.SeekStart); err != nil {
		return fmt.Errorf("verity: %w", err)
	}
	// *os.File.ReadFrom uses copy_file_range(2): a kernel-side copy, a
	// reflink on filesystems that share extents.
	n, err := out.ReadFrom(io.LimitReader(tmp, size))
	if err == nil && n != size {
		err = fmt.Errorf("copied %d of the %d bytes of the tree", n, size)
	}
	if err != nil {
		if end := int64(p.HashOffset) + size; end > oldSize {
			out.Truncate(oldSize) // best effort: the error says the format failed
		}
		return fmt.Errorf("verity: writing the tree into %s: %w", out.Name(), err)
	}
	return nil
}
