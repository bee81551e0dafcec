package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Prefetch traces (issue 12 item 3): serve --record-trace FILE records the
// device byte ranges a workload read; index --prefetch-trace FILE stores
// them in the image's index, and serving the indexed image fetches them
// first. The file is text, one range per line: "OFFSET LENGTH" in bytes of
// the merged device, then the image path of the file whose data it is (a
// read across several files gives a line per file; a range outside file
// data, such as metadata, has no path). '#' starts a comment.

const traceHeader = "# rafsnbd serve --record-trace: device ranges read (offset length [file]); rafsnbd index --prefetch-trace takes it\n"

// tracingDevice records the ranges read from an image device.
type tracingDevice struct {
	*blockdev.Image
	mu     sync.Mutex
	ranges []blobcache.Range
}

func (d *tracingDevice) record(off int64, n int) {
	if n <= 0 {
		return
	}
	d.mu.Lock()
	d.ranges = append(d.ranges, blobcache.Range{Off: off, Len: int64(n)})
	if len(d.ranges) >= 1<<16 { // keep it bounded under long workloads
		d.ranges = mergeDeviceRanges(d.ranges)
	}
	d.mu.Unlock()
}

func (d *tracingDevice) ReadAt(p []byte, off int64) (int, error) {
	n, err := d.Image.ReadAt(p, off)
	if err == nil {
		d.record(off, n)
	}
	return n, err
}

func (d *tracingDevice) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := d.Image.ReadAtContext(ctx, p, off)
	if err == nil {
		d.record(off, n)
	}
	return n, err
}

// mergeDeviceRanges sorts ranges and merges those that touch.
func mergeDeviceRanges(rs []blobcache.Range) []blobcache.Range {
	sort.Slice(rs, func(i, j int) bool { return rs[i].Off < rs[j].Off })
	var out []blobcache.Range
	for _, r := range rs {
		if n := len(out); n > 0 && r.Off <= out[n-1].Off+out[n-1].Len {
			out[n-1].Len = max(out[n-1].Off+out[n-1].Len, r.Off+r.Len) - out[n-1].Off
			continue
		}
		out = append(out, r)
	}
	return out
}

// fileSpan is a regular file's bytes on the device.
type fileSpan struct {
	off, len int64
	path     string
}

// deviceFiles lists where the image's regular files lie on its device,
// sorted by offset (a hard-linked file once, by its first path).
func deviceFiles(img *blockdev.Image) ([]fileSpan, error) {
	ri := img.Rafs
	bs := int64(ri.BlockSize)
	var out []fileSpan
	seen := map[uint64]bool{}
	err := ri.Walk(func(path string, e *rafs.Entry) error {
		if !e.IsRegular() || seen[e.Nid] {
			return nil
		}
		seen[e.Nid] = true
		exts, err := ri.FileExtents(e)
		if err != nil {
			return err
		}
		for _, x := range exts {
			if x.Blob < 0 || x.Blob >= len(ri.DeviceSlots) {
				continue
			}
			off := int64(ri.DeviceSlots[x.Blob].MappedBlkAddr)*bs + int64(x.BlobOffset)
			if n := len(out); n > 0 && out[n-1].path == path && out[n-1].off+out[n-1].len == off {
				out[n-1].len += int64(x.Length)
				continue
			}
			out = append(out, fileSpan{off: off, len: int64(x.Length), path: path})
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].off < out[j].off })
	return out, err
}

// writeTrace writes the recorded ranges to path, atomically, each split
// along the files it covers.
func (d *tracingDevice) writeTrace(path string) error {
	d.mu.Lock()
	ranges := mergeDeviceRanges(d.ranges)
	d.mu.Unlock()
	files, err := deviceFiles(d.Image)
	if err != nil {
		return fmt.Errorf("--record-trace %s: %w", path, err)
	}
	var b strings.Builder
	b.WriteString(traceHeader)
	for _, r := range ranges {
		off, end := r.Off, r.Off+r.Len
		i := sort.Search(len(files), func(i int) bool { return files[i].off+files[i].len > off })
		for off < end {
			if i >= len(files) || files[i].off >= end {
				fmt.Fprintf(&b, "%d %d\n", off, end-off)
				break
			}
			f := files[i]
			if f.off > off {
				fmt.Fprintf(&b, "%d %d\n", off, f.off-off)
				off = f.off
			}
			hi := min(end, f.off+f.len)
			fmt.Fprintf(&b, "%d %d %s\n", off, hi-off, f.path)
			off = hi
			i++
		}
	}
	return atomicfile.WriteFile(path, []byte(b.String()), 0o644)
}

// readTrace reads a --record-trace file's ranges.
func readTrace(path string) ([]oci.DeviceRange, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []oci.DeviceRange
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		fields := strings.SplitN(text, " ", 3)
		var off, n int64
		if len(fields) >= 2 {
			off, err = strconv.ParseInt(fields[0], 10, 64)
			if err == nil {
				n, err = strconv.ParseInt(fields[1], 10, 64)
			}
		}
		if len(fields) < 2 || err != nil || off < 0 || n <= 0 || off > 1<<62-n {
			return nil, fmt.Errorf("%s:%d: want OFFSET LENGTH [FILE], as serve --record-trace writes", path, line)
		}
		out = append(out, oci.DeviceRange{Off: off, Len: n})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// prefetchIndexed queues what the index says to fetch first: its files
// and its device ranges, mapped to the layers holding them.
func prefetchIndexed(img *blockdev.Image, p oci.IndexPrefetch) error {
	byBlob, err := blobcache.PrefetchRanges(img.Rafs, p.Files)
	if err != nil {
		return fmt.Errorf("the index's prefetch list: %w", err)
	}
	ri := img.Rafs
	bs := int64(ri.BlockSize)
	for _, r := range p.Ranges {
		for bi := range ri.Blobs {
			start := int64(ri.DeviceSlots[bi].MappedBlkAddr) * bs
			size := int64(ri.Blobs[bi].UncompressedSize)
			lo, hi := max(r.Off, start), min(r.Off+r.Len, start+size)
			if lo < hi {
				byBlob[bi] = append(byBlob[bi], blobcache.Range{Off: lo - start, Len: hi - lo})
			}
		}
	}
	for bi, rs := range byBlob {
		if bi >= len(img.Blobs) {
			continue
		}
		if h, ok := img.Blobs[bi].(*blobcache.Handle); ok {
			h.Prefetch(rs...)
		}
	}
	return nil
}
