// Package fusedev exposes a read-only device as one read-only regular file
// through FUSE, so that a host without the nbd module can still mount the
// device: EROFS mounts the file directly (file-backed mount) or through a
// loop device.
//
// Every FUSE READ becomes one device read of the requested range, through
// ReadAtContext when the device has it, with the request's context (which
// go-fuse cancels when the kernel interrupts the request). A failed or
// short device read is answered with EIO and no data: a caller never sees
// bytes the device did not return.
//
// The file is served for throughput: reads go through the page cache
// (no direct_io, FOPEN_KEEP_CACHE, since the content never changes),
// requests up to 1 MiB, asynchronous reads served on many goroutines, and
// the FUSE connection's readahead raised after the mount (the kernel caps
// the value negotiated at INIT at 128 KiB).
package fusedev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Device is what is served: random-access reads over a fixed size, safe
// for concurrent use. Devices that may wait on a network also implement
// ContextReaderAt.
type Device interface {
	io.ReaderAt
	Size() int64
}

// ContextReaderAt is a Device whose reads can be cancelled.
type ContextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Options tune a Server. The zero value is usable.
type Options struct {
	// Name is the file's name in the FUSE directory; default "disk".
	Name string
	// MaxRead is the largest READ the kernel sends, in bytes; default and
	// maximum 1 MiB (the kernel's FUSE limit).
	MaxRead int
	// ReadAheadKB is written to the connection's read_ahead_kb after the
	// mount; default 4096. Negative leaves the kernel's value.
	ReadAheadKB int
	// FsName is shown as the mount's source in /proc/mounts; default
	// "rafsnbd".
	FsName string
	// OnError, if set, is called for every failed device read (for logs).
	OnError func(off int64, n int, err error)
}

// Stats are a Server's counters since it started.
type Stats struct {
	Reads      uint64 `json:"reads"`
	BytesRead  uint64 `json:"bytes_read"`
	ReadErrors uint64 `json:"read_errors"`
}

// Server is one FUSE mount serving one device as a file.
type Server struct {
	dir    string
	path   string
	conn   int
	server *fuse.Server
	node   *fileNode
}

const maxKernelRead = 1 << 20

// Mount mounts a FUSE filesystem on dir (an existing, empty directory)
// holding one file that reads as dev. It returns once the kernel has the
// mount; the file is served until Unmount, or until the FUSE connection
// is aborted.
func Mount(dir string, dev Device, opts Options) (*Server, error) {
	if opts.Name == "" {
		opts.Name = "disk"
	}
	if opts.MaxRead <= 0 || opts.MaxRead > maxKernelRead {
		opts.MaxRead = maxKernelRead
	}
	if opts.ReadAheadKB == 0 {
		opts.ReadAheadKB = 4096
	}
	if opts.FsName == "" {
		opts.FsName = "rafsnbd"
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	node := &fileNode{dev: dev, size: dev.Size(), onError: opts.OnError}
	if c, ok := dev.(ContextReaderAt); ok {
		node.ctxDev = c
	}
	root := &rootNode{name: opts.Name, file: node}
	// The file never changes: the kernel may keep names and attributes
	// for as long as it likes.
	forever := 365 * 24 * time.Hour
	server, err := fs.Mount(abs, root, &fs.Options{
		EntryTimeout: &forever,
		AttrTimeout:  &forever,
		MountOptions: fuse.MountOptions{
			// Root mounts EROFS on the file in the kernel; other users
			// read through that mount, not this one.
			DirectMountStrict:  true,
			FsName:             opts.FsName,
			Name:               "rafsnbd",
			MaxWrite:           opts.MaxRead,
			MaxReadAhead:       opts.MaxRead,
			MaxBackground:      64,
			DisableXAttrs:      true,
			DisableReadDirPlus: true,
			// Splicing a device read buys nothing: the bytes come from
			// memory, not from a file descriptor.
			DisableSplice: true,
			// With passthrough negotiated the kernel stacks the FUSE
			// superblock (s_stack_depth 1), and EROFS refuses a
			// file-backed mount on a stacked filesystem ("file-backed
			// mounts cannot be applied to stacked fses"). Nothing here
			// passes through to a backing file anyway.
			DisabledCapabilities: fuse.CAP_PASSTHROUGH,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("FUSE mount on %s: %w", abs, err)
	}
	s := &Server{dir: abs, path: filepath.Join(abs, opts.Name), server: server, node: node, conn: -1}
	var st unix.Stat_t
	if err := unix.Stat(abs, &st); err == nil {
		// The connection's id in /sys/fs/fuse/connections is the minor
		// number of the mount's anonymous device; its bdi is MAJ:MIN.
		s.conn = int(unix.Minor(st.Dev))
		if opts.ReadAheadKB > 0 {
			bdi := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
			// Best effort: without it reads still work, only slower.
			_ = os.WriteFile(bdi, []byte(strconv.Itoa(opts.ReadAheadKB)), 0)
		}
	}
	return s, nil
}

// Path is the served file's path.
func (s *Server) Path() string { return s.path }

// Dir is the FUSE mount's directory.
func (s *Server) Dir() string { return s.dir }

// Connection is the connection's number in /sys/fs/fuse/connections, or -1
// when it could not be found.
func (s *Server) Connection() int { return s.conn }

// Stats returns the read counters.
func (s *Server) Stats() Stats {
	return Stats{
		Reads:      s.node.reads.Load(),
		BytesRead:  s.node.bytes.Load(),
		ReadErrors: s.node.errors.Load(),
	}
}

// Wait returns when the FUSE mount is gone (unmounted or aborted).
func (s *Server) Wait() { s.server.Wait() }

// Unmount unmounts the FUSE filesystem. It fails (EBUSY) while the file is
// in use, for instance while EROFS is mounted on it.
func (s *Server) Unmount() error {
	if err := s.server.Unmount(); err != nil {
		return fmt.Errorf("unmount FUSE %s: %w", s.dir, err)
	}
	return nil
}

// Abort ends the FUSE connection through /sys/fs/fuse/connections: every
// pending and later request fails with ENOTCONN, even ones the server is
// stuck on. The mount stays until it is unmounted (lazily if busy).
func Abort(conn int) error {
	if conn < 0 {
		return errors.New("FUSE connection unknown")
	}
	p := filepath.Join(ConnectionsDir, strconv.Itoa(conn), "abort")
	if err := os.WriteFile(p, []byte("1"), 0); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil // already gone
		}
		return fmt.Errorf("abort FUSE connection %d: %w", conn, err)
	}
	return nil
}

// ConnectionsDir is where the kernel lists FUSE connections (fusectl).
const ConnectionsDir = "/sys/fs/fuse/connections"

// ConnectionExists reports whether FUSE connection conn is still listed.
func ConnectionExists(conn int) bool {
	if conn < 0 {
		return false
	}
	_, err := os.Stat(filepath.Join(ConnectionsDir, strconv.Itoa(conn)))
	return err == nil
}

type rootNode struct {
	fs.Inode
	name string
	file *fileNode
}

var _ fs.NodeOnAdder = (*rootNode)(nil)

func (r *rootNode) OnAdd(ctx context.Context) {
	ch := r.NewPersistentInode(ctx, r.file, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
	r.AddChild(r.name, ch, false)
}

func (r *rootNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	return 0
}

type fileNode struct {
	fs.Inode
	dev     Device
	ctxDev  ContextReaderAt
	size    int64
	onError func(off int64, n int, err error)

	reads, bytes, errors atomic.Uint64
}

var (
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeGetattrer = (*fileNode)(nil)
)

func (f *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o444
	out.Size = uint64(f.size)
	out.Blocks = (uint64(f.size) + 511) / 512
	out.Nlink = 1
	return 0
}

func (f *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	// The content never changes: keep the page cache across opens.
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (f *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= f.size {
		return fuse.ReadResultData(nil), 0
	}
	if rest := f.size - off; int64(len(dest)) > rest {
		dest = dest[:rest]
	}
	var n int
	var err error
	if f.ctxDev != nil {
		n, err = f.ctxDev.ReadAtContext(ctx, dest, off)
	} else {
		n, err = f.dev.ReadAt(dest, off)
	}
	if n == len(dest) && errors.Is(err, io.EOF) {
		err = nil // a full read that ends at the device's end
	}
	if err == nil && n != len(dest) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		f.errors.Add(1)
		if f.onError != nil {
			f.onError(off, len(dest), err)
		}
		return nil, syscall.EIO
	}
	f.reads.Add(1)
	f.bytes.Add(uint64(n))
	return fuse.ReadResultData(dest), 0
}
