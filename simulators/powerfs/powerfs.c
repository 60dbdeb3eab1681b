/*
 * powerfs: a FUSE passthrough that behaves like a disk behind a volatile page cache, so a
 * test can cut the power (in the spirit of Jepsen's LazyFS).
 *
 *   powerfs BACKING GRAVEYARD MOUNTPOINT
 *
 * Data: every write, truncate and size change of a regular file stays in memory (per inode,
 * 4 KiB pages over the backing file) until an fsync/fdatasync of any descriptor of that
 * file writes them through to BACKING. Reads see backing + pending (like a page cache).
 * Metadata (create, mkdir, mknod, symlink, link, unlink, rmdir, rename) is applied to BACKING
 * at once, so every process sees it, but it is *journalled*: each operation records how to
 * undo it, and the whole log becomes durable only at the next fsync, fdatasync or directory
 * fsync of anything on the mount (what an ext4 journal commit does; ext4's 5-second periodic
 * commit is not modelled, which makes this harsher, never kinder). Unlinked files and
 * replaced rename targets wait in GRAVEYARD (same filesystem as BACKING) until then.
 * chmod/chown/utimens pass through and are durable at once (nothing here depends on them).
 * A file unlinked while open lives on under a hidden name (libfuse's .fuse_hidden, not
 * listed, not counted in st_nlink) until it is closed; hidden files left by a cut are
 * removed at mount, like ext4's orphan list.
 *
 * Control: one command per line on stdin, one JSON line per answer on stdout.
 *   cut    discard every unsynced write and size change of every file, undo every metadata
 *          operation since the last commit; then every operation fails with EIO until the
 *          process exits (the caller kills the writers first and remounts afterwards)
 *   sync   write everything back, as a clean shutdown or the kernel's writeback would
 *   stats  counters and the amount of unsynced state
 * EOF on stdin is a clean shutdown: write everything back (unless cut), unmount, exit; so a
 * dead test runner never leaves a mount behind (auto_unmount covers this process being
 * killed).
 *
 * Free space: a write that needs new blocks beyond the backing file's end is refused with
 * ENOSPC when the backing filesystem could not hold it together with everything already
 * pending (delayed allocation reserves space at write time, as ext4 does); statfs reports
 * the space left after the pending writes.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <fuse.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <unistd.h>

#define PAGE 4096u
#define NBUCKETS 1024u

/* ------------------------------------------------------------------ state */

struct page {
	uint64_t idx;
	int alloc; /* lies beyond the backing file's end: counted in g_reserved_pages */
	struct page *next;
	unsigned char data[PAGE];
};

/* Unsynced state of one inode; exists only while something is pending. */
struct istate {
	dev_t dev;
	ino_t ino;
	int fd;            /* our own O_RDWR descriptor: keeps the inode (and its number) alive */
	off_t size;        /* logical size seen by readers */
	off_t base_limit;  /* backing bytes below this are still valid; zeros above */
	off_t backing_size;
	struct page **pages;
	size_t npages, nslots;
	struct istate *next;
};

struct handle {
	int fd;
	dev_t dev;
	ino_t ino;
};

struct dhandle {
	DIR *dir;
	off_t offset;
	struct dirent *entry;
};

enum undo_kind { U_CREATED, U_REMOVED_FILE, U_REMOVED_DIR, U_RENAMED, U_EXCHANGED };

struct undo {
	enum undo_kind kind;
	int is_dir;
	char *a, *b;
	char grave[32]; /* a graveyard entry this operation keeps alive, or "" */
	dev_t grave_dev;
	ino_t grave_ino;
	int recreate_dir;
	mode_t mode;
	uid_t uid;
	gid_t gid;
	struct undo *prev;
};

static int g_backing = -1, g_grave = -1;
static pthread_rwlock_t g_lock;
static int g_dead;
static pthread_t g_main;
static struct istate *g_states[NBUCKETS];
static struct undo *g_undo;
static uint64_t g_grave_seq;
static uint64_t g_reserved_pages;
static uint64_t g_writes, g_fsyncs, g_commits, g_flushed_bytes; /* atomics */

#define RD() pthread_rwlock_rdlock(&g_lock)
#define WR() pthread_rwlock_wrlock(&g_lock)
#define UN() pthread_rwlock_unlock(&g_lock)
#define CHECK_ALIVE() do { if (g_dead) { UN(); return -EIO; } } while (0)

static const char *rel(const char *path)
{
	return path[1] ? path + 1 : ".";
}

static struct handle *H(struct fuse_file_info *fi)
{
	return (struct handle *)(uintptr_t)fi->fh;
}

static void bump(uint64_t *counter, uint64_t n)
{
	__atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

static ssize_t pread_full(int fd, void *buf, size_t len, off_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t r = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			break;
		done += (size_t)r;
	}
	return (ssize_t)done;
}

static int pwrite_full(int fd, const void *buf, size_t len, off_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t r = pwrite(fd, (const char *)buf + done, len - done, off + (off_t)done);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		done += (size_t)r;
	}
	return 0;
}

/* ------------------------------------------------------------------ inode states */

static unsigned bucket_of(dev_t dev, ino_t ino)
{
	return (unsigned)((ino * 2654435761u) ^ dev) % NBUCKETS;
}

static struct istate *state_find(dev_t dev, ino_t ino)
{
	for (struct istate *s = g_states[bucket_of(dev, ino)]; s; s = s->next)
		if (s->ino == ino && s->dev == dev)
			return s;
	return NULL;
}

/* A state for the inode open as `fd` (not consumed). */
static int state_get(int fd, dev_t dev, ino_t ino, struct istate **out)
{
	struct istate *s = state_find(dev, ino);
	if (s) {
		*out = s;
		return 0;
	}
	struct stat st;
	if (fstat(fd, &st) < 0)
		return -errno;
	char proc[64];
	snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
	int own = open(proc, O_RDWR | O_CLOEXEC);
	if (own < 0)
		return -errno;
	s = calloc(1, sizeof *s);
	if (!s) {
		close(own);
		return -ENOMEM;
	}
	s->dev = dev;
	s->ino = ino;
	s->fd = own;
	s->size = s->base_limit = s->backing_size = st.st_size;
	s->nslots = 64;
	s->pages = calloc(s->nslots, sizeof *s->pages);
	if (!s->pages) {
		close(own);
		free(s);
		return -ENOMEM;
	}
	unsigned b = bucket_of(dev, ino);
	s->next = g_states[b];
	g_states[b] = s;
	*out = s;
	return 0;
}

static struct page *page_find(struct istate *s, uint64_t idx)
{
	for (struct page *p = s->pages[idx % s->nslots]; p; p = p->next)
		if (p->idx == idx)
			return p;
	return NULL;
}

static void page_rehash(struct istate *s)
{
	size_t nslots = s->nslots * 4;
	struct page **pages = calloc(nslots, sizeof *pages);
	if (!pages)
		return; /* keep the old table: slower, still correct */
	for (size_t i = 0; i < s->nslots; i++) {
		struct page *p = s->pages[i];
		while (p) {
			struct page *next = p->next;
			p->next = pages[p->idx % nslots];
			pages[p->idx % nslots] = p;
			p = next;
		}
	}
	free(s->pages);
	s->pages = pages;
	s->nslots = nslots;
}

/* Bytes of the file as they were at the last sync: backing below base_limit, zeros above. */
static int base_read(struct istate *s, unsigned char *buf, size_t len, off_t off)
{
	size_t valid = 0;
	if (off < s->base_limit)
		valid = (size_t)(s->base_limit - off) < len ? (size_t)(s->base_limit - off) : len;
	size_t got = 0;
	if (valid) {
		ssize_t r = pread_full(s->fd, buf, valid, off);
		if (r < 0)
			return (int)r;
		got = (size_t)r;
	}
	memset(buf + got, 0, len - got);
	return 0;
}

static void page_free(struct page *p)
{
	if (p->alloc)
		g_reserved_pages--;
	free(p);
}

static void state_drop_pages(struct istate *s, off_t from)
{
	for (size_t i = 0; i < s->nslots; i++) {
		struct page **pp = &s->pages[i];
		while (*pp) {
			struct page *p = *pp;
			if ((off_t)(p->idx * PAGE) >= from) {
				*pp = p->next;
				page_free(p);
				s->npages--;
			} else {
				pp = &p->next;
			}
		}
	}
}

static void state_free(struct istate *s)
{
	unsigned b = bucket_of(s->dev, s->ino);
	for (struct istate **pp = &g_states[b]; *pp; pp = &(*pp)->next)
		if (*pp == s) {
			*pp = s->next;
			break;
		}
	state_drop_pages(s, 0);
	free(s->pages);
	close(s->fd);
	free(s);
}

static ssize_t state_read(struct istate *s, char *buf, size_t len, off_t off)
{
	if (off >= s->size)
		return 0;
	if ((off_t)len > s->size - off)
		len = (size_t)(s->size - off);
	size_t done = 0;
	while (done < len) {
		off_t pos = off + (off_t)done;
		uint64_t idx = (uint64_t)pos / PAGE;
		size_t in = (size_t)(pos % PAGE);
		size_t n = PAGE - in < len - done ? PAGE - in : len - done;
		struct page *p = page_find(s, idx);
		if (p) {
			memcpy(buf + done, p->data + in, n);
		} else {
			/* Coalesce the run of clean pages that follows into one backing read. */
			while (done + n < len && !page_find(s, (uint64_t)(pos + (off_t)n) / PAGE))
				n = len - done - n < PAGE ? len - done : n + PAGE;
			int r = base_read(s, (unsigned char *)buf + done, n, pos);
			if (r < 0)
				return r;
		}
		done += n;
	}
	return (ssize_t)len;
}

static int has_room(uint64_t pages)
{
	struct statvfs sv;
	if (fstatvfs(g_backing, &sv) < 0)
		return 1; /* cannot tell: let the sync report it */
	uint64_t avail = (uint64_t)sv.f_bavail * sv.f_frsize / PAGE;
	return avail >= g_reserved_pages + pages;
}

static ssize_t state_write(struct istate *s, const char *buf, size_t len, off_t off)
{
	if (len == 0)
		return 0;
	uint64_t first = (uint64_t)off / PAGE, last = (uint64_t)(off + (off_t)len - 1) / PAGE;
	uint64_t need = 0;
	for (uint64_t idx = first; idx <= last; idx++)
		if ((off_t)(idx * PAGE) >= s->backing_size && !page_find(s, idx))
			need++;
	if (need && !has_room(need))
		return -ENOSPC;
	size_t done = 0;
	ssize_t err = 0;
	for (uint64_t idx = first; idx <= last; idx++) {
		off_t pos = off + (off_t)done;
		size_t in = (size_t)(pos % PAGE);
		size_t n = PAGE - in < len - done ? PAGE - in : len - done;
		struct page *p = page_find(s, idx);
		if (!p) {
			p = malloc(sizeof *p);
			if (!p) {
				err = -ENOMEM;
				break;
			}
			p->idx = idx;
			p->alloc = (off_t)(idx * PAGE) >= s->backing_size;
			/* Partial page: start from what a reader sees now (zeros past the size). */
			if (in != 0 || n != PAGE) {
				int r = base_read(s, p->data, PAGE, (off_t)(idx * PAGE));
				if (r < 0) {
					free(p);
					err = r;
					break;
				}
				if ((off_t)(idx * PAGE + PAGE) > s->size) {
					off_t keep = s->size - (off_t)(idx * PAGE);
					if (keep < 0)
						keep = 0;
					memset(p->data + keep, 0, PAGE - (size_t)keep);
				}
			}
			if (p->alloc)
				g_reserved_pages++;
			p->next = s->pages[idx % s->nslots];
			s->pages[idx % s->nslots] = p;
			if (++s->npages > s->nslots * 2)
				page_rehash(s);
		}
		memcpy(p->data + in, buf + done, n);
		done += n;
	}
	if (off + (off_t)done > s->size)
		s->size = off + (off_t)done;
	return done ? (ssize_t)done : err;
}

static void state_truncate(struct istate *s, off_t size)
{
	if (size < s->size) {
		state_drop_pages(s, (size + PAGE - 1) / PAGE * PAGE);
		if (size % PAGE) {
			struct page *p = page_find(s, (uint64_t)size / PAGE);
			if (p)
				memset(p->data + size % PAGE, 0, PAGE - (size_t)(size % PAGE));
		}
		if (size < s->base_limit)
			s->base_limit = size;
	}
	s->size = size;
}

/* Write one inode's pending state through to the backing file; frees the state on success. */
static int state_flush(struct istate *s)
{
	int r;
	if (s->base_limit < s->backing_size && ftruncate(s->fd, s->base_limit) < 0)
		return -errno;
	s->backing_size = s->base_limit;
	uint64_t bytes = 0;
	for (size_t i = 0; i < s->nslots; i++)
		for (struct page *p = s->pages[i]; p; p = p->next) {
			off_t at = (off_t)(p->idx * PAGE);
			size_t n = s->size - at < (off_t)PAGE ? (size_t)(s->size - at) : PAGE;
			if ((r = pwrite_full(s->fd, p->data, n, at)) < 0)
				return r; /* state kept: a retry writes it all again */
			bytes += n;
		}
	if (ftruncate(s->fd, s->size) < 0)
		return -errno;
	bump(&g_flushed_bytes, bytes);
	state_free(s);
	return 0;
}

/* ------------------------------------------------------------------ metadata journal */

static struct undo *undo_push(enum undo_kind kind, const char *a, const char *b)
{
	struct undo *u = calloc(1, sizeof *u);
	if (!u)
		return NULL;
	u->kind = kind;
	u->a = strdup(a);
	u->b = b ? strdup(b) : NULL;
	u->prev = g_undo;
	g_undo = u;
	return u;
}

static void undo_free(struct undo *u)
{
	free(u->a);
	free(u->b);
	free(u);
}

static void grave_name(char out[32])
{
	snprintf(out, 32, "g%" PRIu64, ++g_grave_seq);
}

/* A journal commit: everything done so far survives a cut. */
static void meta_commit(void)
{
	if (g_undo)
		bump(&g_commits, 1);
	while (g_undo) {
		struct undo *u = g_undo;
		g_undo = u->prev;
		if (u->grave[0] && unlinkat(g_grave, u->grave, 0) < 0)
			fprintf(stderr, "powerfs: cannot purge %s: %s\n", u->grave, strerror(errno));
		undo_free(u);
	}
}

static void mkdir_as(const char *path, mode_t mode, uid_t uid, gid_t gid, int *errors)
{
	if (mkdirat(g_backing, path, mode & 07777) < 0 ||
	    fchownat(g_backing, path, uid, gid, AT_SYMLINK_NOFOLLOW) < 0) {
		fprintf(stderr, "powerfs: undo mkdir %s: %s\n", path, strerror(errno));
		++*errors;
	}
}

static void undo_rename(int from_dir, const char *from, int to_dir, const char *to, int *errors)
{
	if (renameat(from_dir, from, to_dir, to) < 0) {
		fprintf(stderr, "powerfs: undo rename %s -> %s: %s\n", from, to, strerror(errno));
		++*errors;
	}
}

/* Roll the namespace back to the last commit, newest operation first. */
static int meta_undo(int *errors)
{
	int n = 0;
	while (g_undo) {
		struct undo *u = g_undo;
		g_undo = u->prev;
		n++;
		switch (u->kind) {
		case U_CREATED:
			if (unlinkat(g_backing, u->a, u->is_dir ? AT_REMOVEDIR : 0) < 0) {
				fprintf(stderr, "powerfs: undo create %s: %s\n", u->a, strerror(errno));
				++*errors;
			}
			break;
		case U_REMOVED_FILE:
			undo_rename(g_grave, u->grave, g_backing, u->a, errors);
			break;
		case U_REMOVED_DIR:
			mkdir_as(u->a, u->mode, u->uid, u->gid, errors);
			break;
		case U_RENAMED:
			undo_rename(g_backing, u->b, g_backing, u->a, errors);
			if (u->grave[0])
				undo_rename(g_grave, u->grave, g_backing, u->b, errors);
			else if (u->recreate_dir)
				mkdir_as(u->b, u->mode, u->uid, u->gid, errors);
			break;
		case U_EXCHANGED:
			if (renameat2(g_backing, u->a, g_backing, u->b, RENAME_EXCHANGE) < 0) {
				fprintf(stderr, "powerfs: undo exchange %s: %s\n", u->a, strerror(errno));
				++*errors;
			}
			break;
		}
		undo_free(u);
	}
	return n;
}

static mode_t masked(mode_t mode)
{
	struct fuse_context *ctx = fuse_get_context();
	return ctx ? mode & ~ctx->umask : mode;
}

static void own_new(const char *path)
{
	struct fuse_context *ctx = fuse_get_context();
	if (geteuid() == 0 && ctx)
		(void)fchownat(g_backing, path, ctx->uid, ctx->gid, AT_SYMLINK_NOFOLLOW);
}

/* ------------------------------------------------------------------ operations */

static void *pf_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	/* Every write() must reach us when it happens, so fsync ordering is exact. */
	conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
	cfg->use_ino = 1;
	/* An unlinked file that is still open becomes a hidden name (libfuse renames it, then
	 * unlinks it at release), so fstat keeps working on it as on a real disk; readdir and
	 * st_nlink hide that name. */
	cfg->hard_remove = 0;
	cfg->nullpath_ok = 1;
	cfg->entry_timeout = 0;
	cfg->attr_timeout = 0;
	cfg->negative_timeout = 0;
	printf("{\"ready\": true, \"pid\": %d}\n", (int)getpid());
	fflush(stdout);
	return NULL;
}

#define HIDDEN_PREFIX ".fuse_hidden"

static int is_hidden(const char *path)
{
	if (!path)
		return 0;
	const char *base = strrchr(path, '/');
	base = base ? base + 1 : path;
	return strncmp(base, HIDDEN_PREFIX, sizeof HIDDEN_PREFIX - 1) == 0;
}

static int pf_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	RD();
	CHECK_ALIVE();
	int r = fi ? fstat(H(fi)->fd, st) : fstatat(g_backing, rel(path), st, AT_SYMLINK_NOFOLLOW);
	if (r < 0) {
		r = -errno;
	} else if (!S_ISDIR(st->st_mode)) {
		/* Graveyard and hidden names are ours, not the file's: an unlinked file has no link
		 * left. */
		if (is_hidden(path) && st->st_nlink > 0)
			st->st_nlink--;
		for (struct undo *u = g_undo; u; u = u->prev)
			if (u->grave[0] && u->grave_ino == st->st_ino && u->grave_dev == st->st_dev &&
			    st->st_nlink > 0)
				st->st_nlink--;
		struct istate *s = S_ISREG(st->st_mode) ? state_find(st->st_dev, st->st_ino) : NULL;
		if (s) {
			st->st_size = s->size;
			st->st_blocks = (s->size + 511) / 512;
		}
	}
	UN();
	return r;
}

static int pf_readlink(const char *path, char *buf, size_t size)
{
	RD();
	CHECK_ALIVE();
	ssize_t n = readlinkat(g_backing, rel(path), buf, size - 1);
	UN();
	if (n < 0)
		return -errno;
	buf[n] = 0;
	return 0;
}

static int pf_mknod(const char *path, mode_t mode, dev_t dev)
{
	WR();
	CHECK_ALIVE();
	int r = mknodat(g_backing, rel(path), masked(mode), dev) < 0 ? -errno : 0;
	if (r == 0) {
		own_new(rel(path));
		if (!undo_push(U_CREATED, rel(path), NULL))
			r = -ENOMEM;
	}
	UN();
	return r;
}

static int pf_mkdir(const char *path, mode_t mode)
{
	WR();
	CHECK_ALIVE();
	int r = mkdirat(g_backing, rel(path), masked(mode)) < 0 ? -errno : 0;
	if (r == 0) {
		own_new(rel(path));
		struct undo *u = undo_push(U_CREATED, rel(path), NULL);
		if (u)
			u->is_dir = 1;
		else
			r = -ENOMEM;
	}
	UN();
	return r;
}

static int pf_unlink(const char *path)
{
	WR();
	CHECK_ALIVE();
	struct stat st;
	if (fstatat(g_backing, rel(path), &st, AT_SYMLINK_NOFOLLOW) < 0) {
		int r = -errno;
		UN();
		return r;
	}
	struct undo *u = undo_push(U_REMOVED_FILE, rel(path), NULL);
	int r = u ? 0 : -ENOMEM;
	if (u) {
		grave_name(u->grave);
		u->grave_dev = st.st_dev;
		u->grave_ino = st.st_ino;
		if (renameat(g_backing, rel(path), g_grave, u->grave) < 0) {
			r = -errno;
			g_undo = u->prev;
			undo_free(u);
		}
	}
	UN();
	return r;
}

static int pf_rmdir(const char *path)
{
	WR();
	CHECK_ALIVE();
	struct stat st;
	int r = fstatat(g_backing, rel(path), &st, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
	if (r == 0 && unlinkat(g_backing, rel(path), AT_REMOVEDIR) < 0)
		r = -errno;
	if (r == 0) {
		struct undo *u = undo_push(U_REMOVED_DIR, rel(path), NULL);
		if (u) {
			u->mode = st.st_mode;
			u->uid = st.st_uid;
			u->gid = st.st_gid;
		}
	}
	UN();
	return r;
}

static int pf_symlink(const char *target, const char *path)
{
	WR();
	CHECK_ALIVE();
	int r = symlinkat(target, g_backing, rel(path)) < 0 ? -errno : 0;
	if (r == 0) {
		own_new(rel(path));
		if (!undo_push(U_CREATED, rel(path), NULL))
			r = -ENOMEM;
	}
	UN();
	return r;
}

static int pf_link(const char *from, const char *to)
{
	WR();
	CHECK_ALIVE();
	int r = linkat(g_backing, rel(from), g_backing, rel(to), 0) < 0 ? -errno : 0;
	if (r == 0 && !undo_push(U_CREATED, rel(to), NULL))
		r = -ENOMEM;
	UN();
	return r;
}

static int pf_rename(const char *from, const char *to, unsigned int flags)
{
	WR();
	CHECK_ALIVE();
	const char *a = rel(from), *b = rel(to);
	int r = 0;
	if (flags & RENAME_EXCHANGE) {
		if (renameat2(g_backing, a, g_backing, b, flags) < 0)
			r = -errno;
		else if (!undo_push(U_EXCHANGED, a, b))
			r = -ENOMEM;
		UN();
		return r;
	}
	if (flags & ~(unsigned)RENAME_NOREPLACE) {
		UN();
		return -EINVAL;
	}
	struct stat src, dst;
	if (fstatat(g_backing, a, &src, AT_SYMLINK_NOFOLLOW) < 0) {
		r = -errno;
		UN();
		return r;
	}
	int exists = fstatat(g_backing, b, &dst, AT_SYMLINK_NOFOLLOW) == 0;
	if (exists && (flags & RENAME_NOREPLACE)) {
		UN();
		return -EEXIST;
	}
	if (exists && src.st_dev == dst.st_dev && src.st_ino == dst.st_ino) {
		UN();
		return 0; /* two names of one file: rename does nothing */
	}
	struct undo *u = undo_push(U_RENAMED, a, b);
	if (!u) {
		UN();
		return -ENOMEM;
	}
	if (exists && !S_ISDIR(dst.st_mode)) {
		/* Keep the replaced file alive under a graveyard name; rename stays atomic. */
		grave_name(u->grave);
		u->grave_dev = dst.st_dev;
		u->grave_ino = dst.st_ino;
		if (linkat(g_backing, b, g_grave, u->grave, 0) < 0) {
			r = -errno;
			u->grave[0] = 0;
		}
	} else if (exists) {
		u->recreate_dir = 1; /* an empty directory: recreated on undo */
		u->mode = dst.st_mode;
		u->uid = dst.st_uid;
		u->gid = dst.st_gid;
	}
	if (r == 0 && renameat2(g_backing, a, g_backing, b, flags) < 0)
		r = -errno;
	if (r < 0) {
		if (u->grave[0])
			unlinkat(g_grave, u->grave, 0);
		g_undo = u->prev;
		undo_free(u);
	}
	UN();
	return r;
}

static int pf_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	RD();
	CHECK_ALIVE();
	int r = fi ? fchmod(H(fi)->fd, mode) : fchmodat(g_backing, rel(path), mode, 0);
	r = r < 0 ? -errno : 0;
	UN();
	return r;
}

static int pf_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	RD();
	CHECK_ALIVE();
	int r = fi ? fchown(H(fi)->fd, uid, gid)
		   : fchownat(g_backing, rel(path), uid, gid, AT_SYMLINK_NOFOLLOW);
	r = r < 0 ? -errno : 0;
	UN();
	return r;
}

static int pf_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	RD();
	CHECK_ALIVE();
	int r = fi ? futimens(H(fi)->fd, tv)
		   : utimensat(g_backing, rel(path), tv, AT_SYMLINK_NOFOLLOW);
	r = r < 0 ? -errno : 0;
	UN();
	return r;
}

static int pf_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	WR();
	CHECK_ALIVE();
	int fd = fi ? H(fi)->fd : openat(g_backing, rel(path), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
	int r = fd < 0 ? -errno : 0;
	struct stat st;
	if (r == 0 && fstat(fd, &st) < 0)
		r = -errno;
	if (r == 0 && !S_ISREG(st.st_mode))
		r = -EINVAL;
	struct istate *s = NULL;
	if (r == 0)
		r = state_get(fd, st.st_dev, st.st_ino, &s);
	if (r == 0)
		state_truncate(s, size);
	if (!fi && fd >= 0)
		close(fd);
	UN();
	return r;
}

static int open_handle(int fd, int flags, struct fuse_file_info *fi)
{
	struct stat st;
	struct handle *h = malloc(sizeof *h);
	if (!h || fstat(fd, &st) < 0) {
		int r = h ? -errno : -ENOMEM;
		free(h);
		close(fd);
		return r;
	}
	h->fd = fd;
	h->dev = st.st_dev;
	h->ino = st.st_ino;
	fi->fh = (uintptr_t)h;
	fi->keep_cache = 0;
	fi->direct_io = 0;
	if ((flags & O_TRUNC) && S_ISREG(st.st_mode)) {
		struct istate *s;
		int r = state_get(fd, h->dev, h->ino, &s);
		if (r < 0) {
			free(h);
			close(fd);
			return r;
		}
		state_truncate(s, 0);
	}
	return 0;
}

static int open_backing(const char *path, int extra, mode_t mode)
{
	/* Our descriptor is always read-write: reads fill partial pages, syncs write back. */
	int fd = openat(g_backing, path, O_RDWR | O_CLOEXEC | extra, mode);
	if (fd < 0 && (errno == EACCES || errno == EROFS || errno == ETXTBSY))
		fd = openat(g_backing, path, O_RDONLY | O_CLOEXEC | extra, mode);
	return fd;
}

static int pf_open(const char *path, struct fuse_file_info *fi)
{
	WR();
	CHECK_ALIVE();
	int fd = open_backing(rel(path), 0, 0);
	int r = fd < 0 ? -errno : open_handle(fd, fi->flags, fi);
	UN();
	return r;
}

static int pf_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	WR();
	CHECK_ALIVE();
	int created = 1;
	int fd = open_backing(rel(path), O_CREAT | O_EXCL, masked(mode));
	if (fd < 0 && errno == EEXIST && !(fi->flags & O_EXCL)) {
		created = 0;
		fd = open_backing(rel(path), 0, 0);
	}
	int r = fd < 0 ? -errno : 0;
	if (r == 0 && created) {
		own_new(rel(path));
		if (!undo_push(U_CREATED, rel(path), NULL)) {
			unlinkat(g_backing, rel(path), 0);
			close(fd);
			r = -ENOMEM;
		}
	}
	if (r == 0)
		r = open_handle(fd, fi->flags, fi);
	UN();
	return r;
}

static int pf_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)path;
	RD();
	CHECK_ALIVE();
	struct handle *h = H(fi);
	struct istate *s = state_find(h->dev, h->ino);
	ssize_t r = s ? state_read(s, buf, size, off) : pread_full(h->fd, buf, size, off);
	UN();
	return (int)r;
}

static int pf_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)path;
	WR();
	CHECK_ALIVE();
	struct handle *h = H(fi);
	struct istate *s;
	int r = state_get(h->fd, h->dev, h->ino, &s);
	ssize_t n = r < 0 ? r : state_write(s, buf, size, off);
	if (n > 0)
		bump(&g_writes, 1);
	UN();
	return (int)n;
}

static int pf_statfs(const char *path, struct statvfs *sv)
{
	(void)path;
	RD();
	CHECK_ALIVE();
	int r = fstatvfs(g_backing, sv) < 0 ? -errno : 0;
	if (r == 0 && sv->f_frsize) {
		uint64_t used = g_reserved_pages * PAGE / sv->f_frsize;
		sv->f_bavail = sv->f_bavail > used ? sv->f_bavail - used : 0;
		sv->f_bfree = sv->f_bfree > used ? sv->f_bfree - used : 0;
	}
	UN();
	return r;
}

static int pf_flush(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	(void)fi;
	return 0; /* close() is not a sync */
}

static int pf_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	struct handle *h = H(fi);
	close(h->fd);
	free(h);
	return 0;
}

static int pf_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	(void)datasync;
	WR();
	CHECK_ALIVE();
	bump(&g_fsyncs, 1);
	meta_commit();
	struct handle *h = H(fi);
	struct istate *s = state_find(h->dev, h->ino);
	int r = s ? state_flush(s) : 0;
	UN();
	return r;
}

static int pf_fallocate(const char *path, int mode, off_t off, off_t len,
			struct fuse_file_info *fi)
{
	(void)path;
	if (mode & ~FALLOC_FL_KEEP_SIZE)
		return -EOPNOTSUPP;
	WR();
	CHECK_ALIVE();
	struct handle *h = H(fi);
	struct istate *s;
	int r = 0;
	if (!(mode & FALLOC_FL_KEEP_SIZE)) {
		r = state_get(h->fd, h->dev, h->ino, &s);
		if (r == 0 && off + len > s->size) {
			off_t grow = off + len - (s->size > s->backing_size ? s->size : s->backing_size);
			if (grow > 0 && !has_room(((uint64_t)grow + PAGE - 1) / PAGE))
				r = -ENOSPC;
			else
				state_truncate(s, off + len);
		}
	}
	UN();
	return r;
}

static int pf_opendir(const char *path, struct fuse_file_info *fi)
{
	RD();
	CHECK_ALIVE();
	int fd = openat(g_backing, rel(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int r = fd < 0 ? -errno : 0;
	if (r == 0) {
		struct dhandle *d = calloc(1, sizeof *d);
		d->dir = d ? fdopendir(fd) : NULL;
		if (!d || !d->dir) {
			r = d ? -errno : -ENOMEM;
			free(d);
			close(fd);
		} else {
			fi->fh = (uintptr_t)d;
		}
	}
	UN();
	return r;
}

static int pf_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t offset,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)path;
	(void)flags;
	RD();
	CHECK_ALIVE();
	struct dhandle *d = (struct dhandle *)(uintptr_t)fi->fh;
	if (offset != d->offset) {
		seekdir(d->dir, offset);
		d->entry = NULL;
		d->offset = offset;
	}
	for (;;) {
		if (!d->entry) {
			errno = 0;
			d->entry = readdir(d->dir);
			if (!d->entry)
				break;
		}
		struct stat st = {.st_ino = d->entry->d_ino, .st_mode = (mode_t)d->entry->d_type << 12};
		off_t next = telldir(d->dir);
		if (!is_hidden(d->entry->d_name) && filler(buf, d->entry->d_name, &st, next, 0))
			break;
		d->entry = NULL;
		d->offset = next;
	}
	UN();
	return 0;
}

static int pf_releasedir(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	struct dhandle *d = (struct dhandle *)(uintptr_t)fi->fh;
	closedir(d->dir);
	free(d);
	return 0;
}

static int pf_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	(void)datasync;
	(void)fi;
	WR();
	CHECK_ALIVE();
	bump(&g_fsyncs, 1);
	meta_commit();
	UN();
	return 0;
}

static const struct fuse_operations ops = {
	.init = pf_init,
	.getattr = pf_getattr,
	.readlink = pf_readlink,
	.mknod = pf_mknod,
	.mkdir = pf_mkdir,
	.unlink = pf_unlink,
	.rmdir = pf_rmdir,
	.symlink = pf_symlink,
	.rename = pf_rename,
	.link = pf_link,
	.chmod = pf_chmod,
	.chown = pf_chown,
	.truncate = pf_truncate,
	.open = pf_open,
	.create = pf_create,
	.read = pf_read,
	.write = pf_write,
	.statfs = pf_statfs,
	.flush = pf_flush,
	.release = pf_release,
	.fsync = pf_fsync,
	.opendir = pf_opendir,
	.readdir = pf_readdir,
	.releasedir = pf_releasedir,
	.fsyncdir = pf_fsyncdir,
	.utimens = pf_utimens,
	.fallocate = pf_fallocate,
};

/* ------------------------------------------------------------------ control */

static void pending(uint64_t *files, uint64_t *bytes)
{
	*files = *bytes = 0;
	for (unsigned b = 0; b < NBUCKETS; b++)
		for (struct istate *s = g_states[b]; s; s = s->next) {
			++*files;
			*bytes += s->npages * PAGE;
		}
}

static uint64_t meta_pending(void)
{
	uint64_t n = 0;
	for (struct undo *u = g_undo; u; u = u->prev)
		n++;
	return n;
}

static void cmd_cut(void)
{
	WR();
	if (g_dead) {
		UN();
		printf("{\"ok\": false, \"error\": \"already cut\"}\n");
		return;
	}
	uint64_t files, bytes;
	pending(&files, &bytes);
	for (unsigned b = 0; b < NBUCKETS; b++)
		while (g_states[b])
			state_free(g_states[b]);
	int errors = 0;
	int undone = meta_undo(&errors);
	g_dead = 1;
	UN();
	printf("{\"ok\": %s, \"discarded_files\": %" PRIu64 ", \"discarded_bytes\": %" PRIu64
	       ", \"undone\": %d, \"undo_errors\": %d}\n",
	       errors ? "false" : "true", files, bytes, undone, errors);
}

static void cmd_sync(void)
{
	WR();
	if (g_dead) {
		UN();
		printf("{\"ok\": false, \"error\": \"cut\"}\n");
		return;
	}
	meta_commit();
	int errors = 0, flushed = 0;
	for (unsigned b = 0; b < NBUCKETS; b++) {
		struct istate *s = g_states[b];
		while (s) {
			struct istate *next = s->next;
			if (state_flush(s) < 0)
				errors++;
			else
				flushed++;
			s = next;
		}
	}
	UN();
	printf("{\"ok\": %s, \"flushed_files\": %d, \"errors\": %d}\n", errors ? "false" : "true",
	       flushed, errors);
}

static void cmd_stats(void)
{
	RD();
	uint64_t files, bytes;
	pending(&files, &bytes);
	uint64_t meta = meta_pending();
	int dead = g_dead;
	UN();
	printf("{\"ok\": true, \"dirty_files\": %" PRIu64 ", \"dirty_bytes\": %" PRIu64
	       ", \"pending_meta\": %" PRIu64 ", \"writes\": %" PRIu64 ", \"fsyncs\": %" PRIu64
	       ", \"commits\": %" PRIu64 ", \"flushed_bytes\": %" PRIu64 ", \"cut\": %s}\n",
	       files, bytes, meta, __atomic_load_n(&g_writes, __ATOMIC_RELAXED),
	       __atomic_load_n(&g_fsyncs, __ATOMIC_RELAXED),
	       __atomic_load_n(&g_commits, __ATOMIC_RELAXED),
	       __atomic_load_n(&g_flushed_bytes, __ATOMIC_RELAXED), dead ? "true" : "false");
}

static void *control(void *arg)
{
	(void)arg;
	char line[256];
	while (fgets(line, sizeof line, stdin)) {
		line[strcspn(line, "\r\n")] = 0;
		if (strcmp(line, "cut") == 0)
			cmd_cut();
		else if (strcmp(line, "sync") == 0)
			cmd_sync();
		else if (strcmp(line, "stats") == 0)
			cmd_stats();
		else
			printf("{\"ok\": false, \"error\": \"unknown command\"}\n");
		fflush(stdout);
	}
	/* The owner closed our stdin (or died): a clean shutdown writes everything back. */
	cmd_sync();
	fflush(stdout);
	pthread_kill(g_main, SIGTERM);
	return NULL;
}

static int remove_orphan(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st;
	(void)ftw;
	if (type == FTW_F && is_hidden(path) && unlink(path) < 0)
		fprintf(stderr, "powerfs: cannot remove orphan %s: %s\n", path, strerror(errno));
	return 0;
}

static int empty_graveyard(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st;
	if (ftw->level > 0 && remove(path) < 0)
		fprintf(stderr, "powerfs: cannot purge %s: %s\n", path, strerror(errno));
	(void)type;
	return 0;
}

int main(int argc, char *argv[])
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s BACKING GRAVEYARD MOUNTPOINT\n", argv[0]);
		return 64;
	}
	g_backing = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	g_grave = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (g_backing < 0 || g_grave < 0) {
		perror("powerfs: backing or graveyard directory");
		return 66;
	}
	struct stat b, g;
	if (fstat(g_backing, &b) < 0 || fstat(g_grave, &g) < 0 || b.st_dev != g.st_dev) {
		fprintf(stderr, "powerfs: graveyard must be on the backing directory's filesystem\n");
		return 66;
	}
	/* Mount-time cleanup, as a journalling filesystem does after a crash: files unlinked
	 * while open whose unlink was committed, and leftovers of a powerfs that died. */
	nftw(argv[1], remove_orphan, 16, FTW_PHYS);
	nftw(argv[2], empty_graveyard, 16, FTW_PHYS | FTW_DEPTH);

	pthread_rwlockattr_t attr;
	pthread_rwlockattr_init(&attr);
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&g_lock, &attr);
	umask(0);
	g_main = pthread_self();

	/* The control thread takes no signals: SIGTERM must reach the FUSE loop. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_t ctl;
	if (pthread_create(&ctl, NULL, control, NULL) != 0) {
		fprintf(stderr, "powerfs: cannot start the control thread\n");
		return 71;
	}
	pthread_detach(ctl);
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	char *fargv[] = {
		argv[0], argv[3], "-f", "-o", "max_threads=16", "-o",
		"allow_other,default_permissions,auto_unmount,fsname=powerfs,subtype=powerfs",
		NULL,
	};
	return fuse_main(7, fargv, &ops, NULL);
}
