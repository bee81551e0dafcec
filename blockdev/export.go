package blockdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/verity"
)

// ExportOptions says what Export writes besides the device bytes.
type ExportOptions struct {
	// Verity, when set, appends a dm-verity hash tree at Verity.HashOffset,
	// hashed while the data is written (the data is read once).
	Verity *verity.Params
	// Progress, when set, is called with the number of device bytes done so
	// far, from the exporting goroutine, at most once per piece.
	Progress func(done int64)
	// NoSync skips the fsync of the file and its directory. The rename
	// still makes the file appear whole to other processes, but a crash
	// soon after may leave it short or missing. Syncing a large image is
	// most of an export's time on a page-cached source.
	NoSync bool
}

// ExportResult describes a finished export.
type ExportResult struct {
	Size int64        // bytes of the file: device bytes, plus the tree if any
	Tree *verity.Tree // nil without verity
}

// exportPiece is how much of the device one read covers: large enough that
// per-call costs vanish, small enough to keep a few in flight.
const exportPiece = 4 << 20

// sparseGrain is the granularity at which all-zero data is left as a hole
// in the output file, as `cp --sparse=always` does per filesystem block.
const sparseGrain = 64 << 10

// Export writes dev to path as a plain disk image: holes between extents
// (and all-zero runs of sparseGrain inside them) become sparse holes. The
// file appears under path only when complete and synced (temp file in the
// same directory, then rename; opts.NoSync skips the syncing), so an
// interrupted export never leaves a partial image under the final name.
// An existing path that is not a regular file (a device node, a symbolic
// link, a directory) is refused: Export never writes through or onto one.
func Export(ctx context.Context, dev Device, path string, opts ExportOptions) (*ExportResult, error) {
	size := dev.Size()
	var builder *verity.Builder
	end := size
	// atomicfile refuses a path that is a device node, a symbolic link or
	// a directory, and its errors name path, not the temporary.
	tmp, err := atomicfile.Create(path)
	if err != nil {
		return nil, err
	}
	defer tmp.Abort()
	if opts.Verity != nil {
		p := *opts.Verity
		if p.DataSize() != uint64(size) {
			return nil, fmt.Errorf("blockdev: export: verity covers %d bytes, device has %d", p.DataSize(), size)
		}
		if p.HashOffset < uint64(size) {
			return nil, fmt.Errorf("blockdev: export: hash offset %d inside the %d-byte device", p.HashOffset, size)
		}
		builder, err = verity.NewBuilder(p, tmp)
		if err != nil {
			return nil, fmt.Errorf("blockdev: export: %w", err)
		}
		defer builder.Close()
	}

	var treeInput io.Writer // stays a nil interface without verity
	if builder != nil {
		treeInput = builder
	}
	if err := copySparse(ctx, dev, tmp, treeInput, opts.Progress); err != nil {
		return nil, exportError(path, err)
	}
	res := &ExportResult{}
	if builder != nil {
		tree, err := builder.Finish()
		if err != nil {
			return nil, exportError(path, err)
		}
		res.Tree = tree
		end = int64(tree.Params.HashOffset + tree.Params.TreeSize())
	}
	// Trailing holes (and the gap before the tree) exist only once the
	// file is long enough.
	if err := tmp.Truncate(end); err != nil {
		return nil, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return nil, err
	}
	if opts.NoSync {
		err = tmp.CommitUnsynced()
	} else {
		err = tmp.Commit()
	}
	if err != nil {
		return nil, err
	}
	res.Size = end
	return res, nil
}

// exportError prefixes err unless it is already about writing path.
func exportError(path string, err error) error {
	var ae *atomicfile.Error
	if errors.As(err, &ae) {
		return err
	}
	return fmt.Errorf("blockdev: export %s: %w", path, err)
}

// extentLister is implemented by devices that know where their holes are.
type extentLister interface{ Extents() []Extent }

// copySparse copies dev to out piece by piece, leaving holes unwritten and
// feeding every byte (holes included) to the verity builder in order.
// Pieces are read by a few goroutines ahead of the writer, because reading
// a compressed blob means decompressing it, which is the slow part.
func copySparse(ctx context.Context, dev Device, out io.WriterAt, tree io.Writer, progress func(int64)) error {
	size := dev.Size()
	var extents []Extent
	if el, ok := dev.(extentLister); ok {
		extents = el.Extents()
	} else {
		extents = []Extent{{Name: "device", Offset: 0, Length: size, Source: dev}}
	}
	isHole := func(off, n int64) bool { // [off, off+n) touches no extent
		for _, e := range extents {
			if e.Offset < off+n && off < e.Offset+e.Length {
				return false
			}
		}
		return true
	}

	type piece struct {
		off  int64
		buf  []byte
		hole bool
		err  error
		done chan struct{}
	}
	workers := max(2, runtime.GOMAXPROCS(0))
	pieces := make(chan *piece, workers)
	free := make(chan []byte, workers+1)
	for i := 0; i < workers+1; i++ {
		free <- make([]byte, exportPiece)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The producer hands out pieces in order; each is read by its own
	// goroutine, bounded by the buffer pool.
	go func() {
		defer close(pieces)
		for off := int64(0); off < size; off += exportPiece {
			n := min(int64(exportPiece), size-off)
			var buf []byte
			select {
			case buf = <-free:
			case <-ctx.Done():
				return
			}
			p := &piece{off: off, buf: buf[:n], done: make(chan struct{})}
			if isHole(off, n) {
				p.hole = true
				clear(p.buf)
				close(p.done)
			} else {
				go func() {
					defer close(p.done)
					_, p.err = dev.ReadAt(p.buf, p.off)
				}()
			}
			select {
			case pieces <- p:
			case <-ctx.Done():
				<-p.done
				return
			}
		}
	}()

	for p := range pieces {
		<-p.done
		if p.err == nil {
			p.err = ctx.Err()
		}
		if p.err == nil && !p.hole {
			p.err = writeNonZero(out, p.buf, p.off)
		}
		if p.err == nil && tree != nil {
			_, p.err = tree.Write(p.buf)
		}
		if p.err != nil {
			cancel()
			for q := range pieces { // let in-flight reads finish before returning
				<-q.done
			}
			return p.err
		}
		if progress != nil {
			progress(p.off + int64(len(p.buf)))
		}
		free <- p.buf[:cap(p.buf)]
	}
	return ctx.Err()
}

var zeroGrain = make([]byte, sparseGrain)

// writeNonZero writes p at off, skipping all-zero grains so they stay holes.
func writeNonZero(out io.WriterAt, p []byte, off int64) error {
	for start := 0; start < len(p); {
		n := min(sparseGrain, len(p)-start)
		if bytes.Equal(p[start:start+n], zeroGrain[:n]) {
			start += n
			continue
		}
		// Coalesce consecutive non-zero grains into one write.
		end := start + n
		for end < len(p) {
			m := min(sparseGrain, len(p)-end)
			if bytes.Equal(p[end:end+m], zeroGrain[:m]) {
				break
			}
			end += m
		}
		if _, err := out.WriteAt(p[start:end], off+int64(start)); err != nil {
			return err
		}
		start = end
	}
	return nil
}
