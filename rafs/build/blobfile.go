package build

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/ctxio"
)

// placedTar is a tar put into the blob directory under a temporary name,
// waiting for the index to succeed before it takes its final name.
type placedTar struct {
	tmp   string
	dir   string
	id    string
	owned bool        // a file of our own (copy or reflink), not a hard link to the caller's
	mode  os.FileMode // given to an owned file
	how   string
}

func (p *placedTar) commit() (string, error) { return commitBlob(p.tmp, p.dir, p.id, p.owned, p.mode) }

// placeTar puts the tar's bytes into the blob directory by the cheapest
// safe means: a reflink, else a hard link, else a streaming copy. It
// hashes the tar unless the caller named the blob.
func placeTar(ctx context.Context, r io.ReaderAt, size int64, opts *Options) (*placedTar, error) {
	if err := os.MkdirAll(opts.BlobDir, 0o755); err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	p := &placedTar{dir: opts.BlobDir, id: opts.BlobID, mode: opts.BlobMode}
	if f, ok := r.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode().IsRegular() && st.Size() == size {
			p.tmp, p.how, p.owned = cloneOrLink(f, opts.BlobDir)
		}
	}
	if p.tmp != "" {
		if p.id == "" {
			sum, err := hashReaderAt(ctx, r, size)
			if err != nil {
				os.Remove(p.tmp)
				return nil, err
			}
			p.id = sum
		}
		return p, nil
	}

	dst, err := newTarTemp(opts.BlobDir)
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	p.tmp, p.how, p.owned = dst.Name(), "copy", true
	var h hash.Hash
	var w io.Writer = dst
	if p.id == "" {
		h = sha256.New()
		w = io.MultiWriter(dst, h)
	}
	_, err = io.CopyBuffer(w, ctxio.NewReader(ctx, io.NewSectionReader(r, 0, size)), make([]byte, 1<<20))
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p.tmp)
		return nil, fmt.Errorf("build: copying the tar to %s: %w", opts.BlobDir, err)
	}
	if h != nil {
		p.id = hex.EncodeToString(h.Sum(nil))
	}
	return p, nil
}

// cloneOrLink gives f a temporary name in dir without copying: a reflink
// (FICLONE) where the filesystem shares extents, else a hard link. It
// returns "" when neither works.
func cloneOrLink(f *os.File, dir string) (tmp, how string, owned bool) {
	dst, err := newTarTemp(dir)
	if err != nil {
		return "", "", false
	}
	name := dst.Name()
	err = unix.IoctlFileClone(int(dst.Fd()), int(f.Fd()))
	dst.Close()
	if err == nil {
		return name, "reflink", true
	}
	os.Remove(name)
	// linkat through /proc links the open file itself, whatever its path.
	proc := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	if err := unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, name, unix.AT_SYMLINK_FOLLOW); err == nil {
		return name, "hardlink", false
	}
	return "", "", false
}

// hashReaderAt returns the sha256 of r's first size bytes. Reading and
// hashing overlap (a reader goroutine fills buffers the hash consumes), so
// the hash runs at the speed of sha256 rather than of sha256 plus copying.
func hashReaderAt(ctx context.Context, r io.ReaderAt, size int64) (string, error) {
	const bufSize, nbuf = 1 << 20, 4
	free := make(chan []byte, nbuf)
	full := make(chan []byte, nbuf)
	for range nbuf {
		free <- make([]byte, bufSize)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(full)
		for off := int64(0); off < size; {
			var b []byte
			select {
			case b = <-free:
			case <-gctx.Done():
				return gctx.Err()
			}
			n, err := r.ReadAt(b[:min(int64(bufSize), size-off)], off)
			if n < len(b[:min(int64(bufSize), size-off)]) {
				if err == nil || errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("build: hashing the tar: at %d: %w", off, err)
			}
			off += int64(n)
			full <- b[:n]
		}
		return nil
	})
	h := sha256.New()
	g.Go(func() error {
		for b := range full {
			h.Write(b)
			free <- b[:cap(b)]
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// newTarTemp creates the temporary a tar is placed (copied, reflinked,
// linked or decompressed) into while it is indexed.
func newTarTemp(dir string) (*atomicfile.File, error) { return atomicfile.CreateIn(dir, "tar") }

// newBlobTemp creates the temporary a blob is written into before its
// hash, and so its name, is known; gc recognises it by atomicfile.IsTemp.
func newBlobTemp(dir string) (*atomicfile.File, error) { return atomicfile.CreateIn(dir, "blob") }

// commitBlob syncs a finished temporary file and renames it to dir/id;
// files of our own get mode.
func commitBlob(tmp, dir, id string, owned bool, mode os.FileMode) (string, error) {
	path := filepath.Join(dir, id)
	if owned {
		if err := os.Chmod(tmp, mode); err != nil {
			return "", fmt.Errorf("build: %w", atomicfile.WriteError(path, err))
		}
	}
	if err := atomicfile.CommitName(tmp, path); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("build: %w", err)
	}
	// rename(2) does nothing when both names are links to one file.
	os.Remove(tmp)
	return path, nil
}
