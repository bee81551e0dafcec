package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/rafs"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:  "cache",
			Usage: "list, trim and fill the cache directory (converted images and lazily fetched blob data)",
			Description: `One --cache-dir holds everything rafsnbd keeps:

  images/, layers/, blobs/   what 'rafsnbd convert' made: per image its merged
                             bootstrap, per layer its tar (the tarfs blob) and
                             bootstrap, and exported disks (*.image.disk,
                             *.layer.disk), shared between images
  blobcache/                 blob data read lazily (serve, nbd, export and
                             cache fetch with --cache-dir): per blob a sparse
                             file of its uncompressed data, a chunk-ready map
                             and its layout

Every chunk is checked against its digest (blake3 or sha256, from the
bootstrap or the blob) before it is cached; tarfs blobs (plain layer tars)
have no digests: their size is checked, and they are cached in 1 MiB units.
'cache ls' lists all of it, 'cache gc' removes what is asked for and
whatever no converted image uses any more, 'cache fetch' fills blobcache/.

  rafsnbd cache fetch --cache-dir /var/cache/rafsnbd -B image.boot \
      --registry registry.example.com/library/app --all
  rafsnbd cache ls --cache-dir /var/cache/rafsnbd
  rafsnbd cache gc --cache-dir /var/cache/rafsnbd --max-size 20GiB`,
			Commands: []*cli.Command{
				{
					Name:  "ls",
					Usage: "list cached blobs: size, chunks cached, disk usage, last use",
					Flags: []cli.Flag{
						cacheDirFlag(),
						jsonFlag(),
					},
					Action: runCacheLs,
				},
				{
					Name:  "gc",
					Usage: "remove converted images and cached blobs: leftovers always, then by age, size or all",
					Description: `Without options gc only removes leftovers: temporary files of interrupted
writes, layer files and disks no converted image uses, and blobs whose
ready map is unreadable. --older-than removes converted images converted
that long ago and cached blobs not opened for that long; --max-size then
removes the least recently used cached blobs until blobcache/ takes at most
that much disk; --all removes everything. gc refuses to run while a
conversion or a serve uses the cache; images already being served stay
readable until closed.

  rafsnbd cache gc --cache-dir /var/cache/rafsnbd --older-than 7d`,
					Flags: []cli.Flag{
						cacheDirFlag(),
						&cli.BoolFlag{Name: "all", Usage: "remove every cached blob"},
						durationFlag("older-than", 0, "remove blobs last used longer ago than `DURATION`"),
						sizeFlag("max-size", 0, "then evict least recently used blobs down to `SIZE` on disk"),
						jsonFlag(),
					},
					Action: runCacheGC,
				},
				{
					Name:      "fetch",
					Usage:     "fill the cache with an image's data: prefetch table and named files, or --all",
					ArgsUsage: "[PATH...]",
					Description: `Fetches, verifies and caches the data of the files named by PATH (a
directory stands for every file below it) and of the bootstrap's prefetch
table, or of whole blobs with --all (--prefetch-all), so that a later
serve reads nothing from the network; --prefetch PATH adds to the PATH
arguments. Blobs come from -D DIR or --registry REPO. Unlike a serve's
background prefetch, fetch works in the foreground and fails on the first
error.`,
					Flags:  append(append(imageFlags(), prefetchFlags()...), jsonFlag()),
					Action: runCacheFetch,
				},
			},
		}
	})
}

func cacheDirFlag() cli.Flag {
	return &cli.StringFlag{Name: "cache-dir", Sources: cli.EnvVars("RAFSNBD_CACHE_DIR"), Usage: "rafsnbd cache `DIR`; blob data lives in DIR/blobcache (created with mode 0750)"}
}

// cacheRoot is --cache-dir: converted images in it, lazily cached blob
// data in its blobcache/.
func cacheRoot(c *cli.Command) (string, error) {
	dir := c.String("cache-dir")
	if dir == "" {
		return "", usagef(c, "no cache directory: give --cache-dir DIR (or set RAFSNBD_CACHE_DIR)")
	}
	return dir, nil
}

func runCacheLs(ctx context.Context, c *cli.Command) error {
	root, err := cacheRoot(c)
	if err != nil {
		return err
	}
	conv, err := oci.ListCache(root)
	if err != nil {
		return err
	}
	blobs, err := blobcache.List(filepath.Join(root, blobCacheSubdir))
	if err != nil {
		return err
	}
	total := conv.Bytes
	for _, e := range blobs {
		total += e.DiskUsage
	}
	if c.Bool("json") {
		return printJSON(c.Root().Writer, cacheListJSON(conv, blobs, total))
	}
	w := c.Root().Writer
	if len(conv.Images) > 0 {
		if err := printConvertedImages(w, conv); err != nil {
			return err
		}
		fmt.Fprintln(w)
	}
	if len(blobs) > 0 || len(conv.Images) == 0 {
		if err := printCacheList(w, blobs); err != nil {
			return err
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "%d converted images, %d layer files and disks, %d lazily cached blobs: %s on disk in %s\n",
		len(conv.Images), len(conv.Files), len(blobs), shortBytes(total), root)
	return nil
}

// cacheListJSON is what cache ls --json prints: everything in the cache.
func cacheListJSON(conv *oci.CacheContents, blobs []blobcache.Entry, total int64) any {
	type imageJSON struct {
		Ref            string    `json:"ref"`
		ManifestDigest string    `json:"manifest_digest"`
		Layers         int       `json:"layers"`
		Bytes          int64     `json:"bytes"` // disk usage of the files only this image uses
		Converted      time.Time `json:"converted"`
		Error          string    `json:"error,omitempty"`
	}
	type fileJSON struct {
		Path   string `json:"path"` // relative to the cache directory
		Kind   string `json:"kind"`
		Bytes  int64  `json:"bytes"`
		Images int    `json:"images"`
	}
	type blobJSON struct {
		ID         string    `json:"id"`
		Size       int64     `json:"size"`
		Units      int       `json:"units"`
		ReadyUnits int       `json:"ready_units"`
		DiskUsage  int64     `json:"disk_usage"`
		LastUsed   time.Time `json:"last_used"`
		Error      string    `json:"error,omitempty"`
	}
	out := struct {
		Images []imageJSON `json:"images"`
		Files  []fileJSON  `json:"files"`
		Blobs  []blobJSON  `json:"blobs"`
		Bytes  int64       `json:"bytes"`
	}{Images: []imageJSON{}, Files: []fileJSON{}, Blobs: []blobJSON{}, Bytes: total}
	for _, im := range conv.Images {
		j := imageJSON{Ref: im.Info.Ref, ManifestDigest: im.Info.ManifestDigest, Layers: len(im.Info.Layers), Bytes: im.Bytes, Converted: im.Info.Converted}
		if im.Err != nil {
			j.Error = im.Err.Error()
		}
		out.Images = append(out.Images, j)
	}
	for _, f := range conv.Files {
		out.Files = append(out.Files, fileJSON{Path: f.Path, Kind: f.Kind, Bytes: f.Bytes, Images: f.Images})
	}
	for _, e := range blobs {
		j := blobJSON{ID: e.ID, Size: e.Size, Units: e.Units, ReadyUnits: e.ReadyUnits, DiskUsage: e.DiskUsage, LastUsed: e.LastUsed.UTC()}
		if e.Err != nil {
			j.Error = e.Err.Error()
		}
		out.Blobs = append(out.Blobs, j)
	}
	return out
}

// printConvertedImages lists what 'rafsnbd convert' put in the cache.
func printConvertedImages(out io.Writer, conv *oci.CacheContents) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "IMAGE\tMANIFEST\tLAYERS\tOWN DISK\tCONVERTED")
	for _, im := range conv.Images {
		if im.Err != nil {
			fmt.Fprintf(w, "-\t%s\t-\t%s\t(%v)\n", shortLabel(im.Info.ManifestDigest), shortBytes(im.Bytes), im.Err)
			continue
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", im.Info.Ref, shortLabel(im.Info.ManifestDigest), len(im.Info.Layers),
			shortBytes(im.Bytes), im.Info.Converted.Local().Format(time.DateTime))
	}
	fmt.Fprintln(w, "\t\t\t\t")
	fmt.Fprintln(w, "FILE\tKIND\tIMAGES\tDISK\t")
	for _, f := range conv.Files {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t\n", shortLabel(f.Path), f.Kind, f.Images, shortBytes(f.Bytes))
	}
	return w.Flush()
}

func printCacheList(out io.Writer, ents []blobcache.Entry) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "BLOB\tSIZE\tCACHED\tDISK\tLAST USED")
	var disk int64
	for _, e := range ents {
		disk += e.DiskUsage
		if e.Err != nil {
			fmt.Fprintf(w, "%s\t-\t-\t%s\t%s\t(%v)\n", e.ID, shortBytes(e.DiskUsage), e.LastUsed.Format(time.DateTime), e.Err)
			continue
		}
		pct := 0.0
		if e.Units > 0 {
			pct = 100 * float64(e.ReadyUnits) / float64(e.Units)
		}
		fmt.Fprintf(w, "%s\t%s\t%d/%d chunks (%.0f%%)\t%s\t%s\n", e.ID, shortBytes(e.Size),
			e.ReadyUnits, e.Units, pct, shortBytes(e.DiskUsage), e.LastUsed.Format(time.DateTime))
	}
	fmt.Fprintf(w, "%d blobs\t\t\t%s\t\n", len(ents), shortBytes(disk))
	return w.Flush()
}

// shortBytes prints a byte count in binary units, compactly.
func shortBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%dB", n)
	}
	v, unit := scaleBytes(uint64(n))
	return fmt.Sprintf("%.1f%s", v, unit)
}

// scaleBytes expresses n (at least 1024) in the largest binary unit, up to
// PiB, that leaves at least 1.
func scaleBytes(n uint64) (float64, string) {
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB"}
	v, u := float64(n)/1024, 0
	for v >= 1024 && u < len(units)-1 {
		v, u = v/1024, u+1
	}
	return v, units[u]
}

func runCacheGC(ctx context.Context, c *cli.Command) error {
	root, err := cacheRoot(c)
	if err != nil {
		return err
	}
	opts := blobcache.GCOptions{All: c.Bool("all"), OlderThan: flagDuration(c, "older-than")}
	if c.IsSet("max-size") {
		if opts.MaxSize = flagSize(c, "max-size"); opts.MaxSize == 0 {
			return usagef(c, "--max-size 0: use --all to empty the cache")
		}
	}
	// Converted images first: a lazily cached blob may be one of their
	// layers, but the blob cache keeps its own data.
	images, freedConv, err := oci.GC(ctx, root, oci.GCOptions{All: opts.All, OlderThan: opts.OlderThan})
	if err != nil {
		return err
	}
	var removed []blobcache.Entry
	if dir := filepath.Join(root, blobCacheSubdir); dirExists(dir) { // gc creates nothing
		cache, err := blobcache.Open(dir, nil)
		if err != nil {
			return err
		}
		removed, err = cache.GC(opts)
		cache.Close()
		if err != nil {
			return err
		}
	}
	freed := freedConv
	for _, e := range removed {
		freed += e.DiskUsage
	}
	if c.Bool("json") {
		type gcJSON struct {
			Images []string `json:"images"` // manifest digests
			Blobs  []string `json:"blobs"`  // lazily cached blob ids
			Freed  int64    `json:"freed_bytes"`
		}
		r := gcJSON{Images: []string{}, Blobs: []string{}, Freed: freed}
		for _, im := range images {
			r.Images = append(r.Images, im.Info.ManifestDigest)
		}
		for _, e := range removed {
			r.Blobs = append(r.Blobs, e.ID)
		}
		return printJSON(c.Root().Writer, r)
	}
	w := c.Root().Writer
	for _, im := range images {
		fmt.Fprintf(w, "removed image %s %s\n", im.Info.Ref, shortLabel(im.Info.ManifestDigest))
	}
	for _, e := range removed {
		fmt.Fprintf(w, "removed blob %s (%s)\n", e.ID, shortBytes(e.DiskUsage))
	}
	fmt.Fprintf(w, "%d images and %d blobs removed, %s freed\n", len(images), len(removed), shortBytes(freed))
	return nil
}

func dirExists(dir string) bool {
	st, err := os.Stat(dir)
	return err == nil && st.IsDir()
}

// openBlobStore returns where blob bytes come from: the OCI repository of
// --registry, or the directory of -D.
func openBlobStore(c *cli.Command) (blobcache.Store, error) {
	dir, repo, err := blobSource(c)
	if err != nil {
		return nil, err
	}
	if repo != "" {
		return registry.New(repo, registry.Options{Insecure: c.Bool("insecure")})
	}
	if dir != "" {
		return localfs.New(dir), nil
	}
	return nil, errors.New("no blob source: give -D BLOBDIR or --registry REPO")
}

// blobSource says where blob bytes come from: a directory (-D, or
// --backend localfs:DIR) or an OCI repository (--registry, or --backend
// registry:REPO).
func blobSource(c *cli.Command) (dir, repo string, err error) {
	dir, repo = c.String("blob-dir"), c.String("registry")
	if spec := c.String("backend"); spec != "" {
		if dir != "" || repo != "" {
			return "", "", errors.New("--backend says where blobs are: drop -D and --registry")
		}
		kind, arg, _ := strings.Cut(spec, ":")
		switch {
		case arg == "":
			return "", "", fmt.Errorf("--backend %q: want localfs:DIR or registry:REPO", spec)
		case kind == "localfs":
			dir = arg
		case kind == "registry":
			repo = arg
		default:
			return "", "", fmt.Errorf("--backend %q: unknown backend %q (want localfs or registry)", spec, kind)
		}
	}
	return dir, repo, nil
}

// blobCacheSubdir is where lazily fetched blob data lives under
// --cache-dir, beside convert's blobs/, layers/ and images/, so that one
// cache directory serves every rafsnbd command.
const blobCacheSubdir = "blobcache"

// blobSourceFlags say where blob bytes come from when not from -D: an OCI
// registry, read lazily through the cache (the command also has
// --cache-dir, and -B/-D from imageFlags).
func blobSourceFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "registry", Usage: "read blobs from OCI repository `REPO` (host[:port]/path), blob sha256:<blob id>, through the cache"},
		&cli.StringFlag{Name: "backend", Usage: "where blobs are, as `SPEC` localfs:DIR or registry:REPO (the same as -D DIR or --registry REPO)"},
		&cli.BoolFlag{Name: "insecure", Usage: "allow plain HTTP to the registry"},
	}
}

// prefetchFlags say what to fetch ahead of reads: the bootstrap's prefetch
// table always, plus files by path, or everything.
func prefetchFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "prefetch-all", Aliases: []string{"all"}, Usage: "fetch every blob whole"},
		&cli.StringSliceFlag{Name: "prefetch", Usage: "fetch the files under `PATH` (repeatable), besides the bootstrap's prefetch table"},
	}
}

// openBlobCache opens (and locks) the blob cache under cacheRoot. One
// process opens it once, however many images it serves.
func openBlobCache(cacheRoot string, log *zerolog.Logger) (*blobcache.Cache, error) {
	return blobcache.Open(filepath.Join(cacheRoot, blobCacheSubdir), &blobcache.Options{Logger: log})
}

// prefetchImage starts background fetching of the bootstrap's prefetch
// table and the files under paths, or of every blob with all.
func prefetchImage(img *blockdev.Image, all bool, paths []string) error {
	handles := make([]*blobcache.Handle, len(img.Blobs))
	for i, b := range img.Blobs {
		handles[i], _ = b.(*blobcache.Handle) // nil: not read through a cache
	}
	if all {
		for _, h := range handles {
			if h != nil {
				h.PrefetchAll()
			}
		}
		return nil
	}
	ranges, err := blobcache.PrefetchRanges(img.Rafs, paths)
	if err != nil {
		return err
	}
	for bi, rs := range ranges {
		if bi < len(handles) && handles[bi] != nil {
			handles[bi].Prefetch(rs...)
		}
	}
	return nil
}

func runCacheFetch(ctx context.Context, c *cli.Command) error {
	log := logger(ctx)
	root, err := cacheRoot(c)
	if err != nil {
		return err
	}
	dir := filepath.Join(root, blobCacheSubdir)
	boot := c.String("bootstrap")
	if boot == "" {
		return errors.New("no image: give -B BOOTSTRAP")
	}
	img, err := rafs.Open(boot)
	if err != nil {
		return err
	}
	defer img.Close()
	store, err := openBlobStore(c)
	if err != nil {
		return err
	}
	ranges := map[int][]blobcache.Range{}
	if c.Bool("prefetch-all") {
		for i := range img.Blobs {
			ranges[i] = []blobcache.Range{{Off: 0, Len: int64(img.Blobs[i].UncompressedSize)}}
		}
	} else if ranges, err = blobcache.PrefetchRanges(img, append(c.Args().Slice(), c.StringSlice("prefetch")...)); err != nil {
		return err
	}
	if len(ranges) == 0 {
		fmt.Fprintln(c.Root().Writer, "nothing to fetch: the image has no prefetch table and no PATH was given (or use --all)")
		return nil
	}
	cache, err := blobcache.Open(dir, &blobcache.Options{Logger: log})
	if err != nil {
		return err
	}
	defer cache.Close()
	var total int64
	for _, rs := range ranges {
		for _, r := range rs {
			total += r.Len
		}
	}
	update, finish := newProgress(total, "fetching")
	defer finish()
	type fetchJSON struct {
		ID           string `json:"id"`
		Size         int64  `json:"size"`
		Units        int    `json:"units"`
		ReadyUnits   int    `json:"ready_units"`
		DiskUsage    int64  `json:"disk_usage"` // as cache ls --json says
		FetchedBytes int64  `json:"fetched_bytes"`
		Requests     int64  `json:"requests"`
	}
	fetched := []fetchJSON{}
	var done int64
	start := time.Now()
	for i := range img.Blobs {
		rs := ranges[i]
		if len(rs) == 0 {
			continue
		}
		e := &img.Blobs[i]
		blob, err := cache.OpenBlob(ctx, store, e, img.ChunkTable)
		if err != nil {
			return err
		}
		for _, r := range rs {
			// Pieces keep the progress bar moving and cancellation prompt.
			for off := r.Off; off < r.Off+r.Len; off += 16 << 20 {
				n := min(16<<20, r.Off+r.Len-off)
				if err := blob.Fetch(ctx, off, n); err != nil {
					blob.Close()
					return err
				}
				done += n
				update(done)
			}
		}
		st := blob.Stats()
		if err := blob.Close(); err != nil { // flushes: the entry below is what cache ls shows
			return err
		}
		ent := cache.Describe(e.ID())
		if ent.Err != nil {
			return ent.Err
		}
		fetched = append(fetched, fetchJSON{ID: ent.ID, Size: ent.Size, Units: ent.Units, ReadyUnits: ent.ReadyUnits,
			DiskUsage: ent.DiskUsage, FetchedBytes: st.BackendBytes, Requests: st.BackendReads})
		if !c.Bool("json") {
			fmt.Fprintf(c.Root().Writer, "blob %s: %d/%d chunks cached, %s on disk; fetched %s in %d requests\n",
				ent.ID, ent.ReadyUnits, ent.Units, shortBytes(ent.DiskUsage), shortBytes(st.BackendBytes), st.BackendReads)
		}
	}
	finish()
	log.Info().Dur("took", time.Since(start)).Int64("bytes", total).Msg("cache filled")
	if c.Bool("json") {
		return printJSON(c.Root().Writer, map[string]any{"blobs": fetched})
	}
	return nil
}
