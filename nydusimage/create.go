package nydusimage

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/ctxio"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// CreateTarfs writes to bootstrapPath the tarfs bootstrap of the tar read
// from r as a stream (a FIFO its writer is still filling, say), naming the
// blob blobID: the same bootstrap build.FromTar makes from the tar file.
// No blob is written: in tarfs mode the blob is the tar itself, which the
// caller keeps (nydus-snapshotter tees the stream into its cache as
// <blob id>). r is read to its end even past the tar's end-of-archive
// marker, so that a writer teeing the stream elsewhere is never cut short.
//
// Only the tar's headers are kept, in a sparse skeleton file of the tar's
// size in a temporary directory (file data left as holes), which
// build.FromTar indexes as it would the tar; the directory is removed
// before returning. The bootstrap appears whole or not at all.
func CreateTarfs(ctx context.Context, r io.Reader, bootstrapPath, blobID string) (*build.Result, error) {
	boot, err := atomicfile.Create(bootstrapPath)
	if err != nil {
		return nil, err
	}
	defer boot.Abort()
	scratch, err := os.MkdirTemp("", "rafsnbd-nydus-image-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)
	skel, err := os.Create(filepath.Join(scratch, "skeleton"))
	if err != nil {
		return nil, err
	}
	defer skel.Close()
	if err := writeSkeleton(ctx, r, skel); err != nil {
		return nil, err
	}
	opts := build.DefaultOptions(filepath.Join(scratch, "blobs"))
	opts.BlobID = blobID
	bw := bufio.NewWriterSize(boot, 1<<20)
	// FromTar places the skeleton in the scratch blob directory (a hard
	// link): it never reaches a directory where it could pass for the tar.
	res, err := build.FromTar(ctx, skel, bw, opts)
	if err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if err := boot.Chmod(0o644); err != nil {
		return nil, err
	}
	if err := boot.Commit(); err != nil {
		return nil, err
	}
	res.Blobs[0].Path, res.Blobs[0].Placed = "", ""
	return res, nil
}

// writeSkeleton copies the tar stream r into skel at the same offsets, all
// but regular files' data, which stays a hole, and reads r to its end.
func writeSkeleton(ctx context.Context, r io.Reader, skel *os.File) error {
	s := &skeletonWriter{r: ctxio.NewReader(ctx, r), skel: skel}
	tr := tar.NewReader(s)
	for first := true; ; first = false {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil && !errors.Is(err, tar.ErrInsecurePath) { // build.FromTar judges names
			if s.err != nil {
				return s.err
			}
			if first {
				return fmt.Errorf("not a tar stream: %w", err)
			}
			return fmt.Errorf("tar at offset %d: %w", s.n, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			s.data = true
			_, err = io.Copy(io.Discard, tr)
			s.data = false
			if err != nil {
				return fmt.Errorf("tar entry %q: %w", hdr.Name, err)
			}
		}
	}
	// What follows the end-of-archive marker is part of the blob too.
	if _, err := io.Copy(io.Discard, s); err != nil {
		return err
	}
	if s.err != nil {
		return s.err
	}
	return skel.Truncate(s.n)
}

// skeletonWriter passes the stream to the tar reader and writes every
// byte read outside file data into skel at its offset.
type skeletonWriter struct {
	r    io.Reader
	skel *os.File
	data bool  // inside a regular file's data: not written
	n    int64 // bytes read so far
	err  error // the first write error
}

func (s *skeletonWriter) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if !s.data && n > 0 && s.err == nil {
		if _, werr := s.skel.WriteAt(p[:n], s.n); werr != nil {
			s.err = werr
		}
	}
	s.n += int64(n)
	if err == nil && s.err != nil {
		err = s.err // stop early: the skeleton cannot be completed
	}
	return n, err
}
