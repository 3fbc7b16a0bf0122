/* An independent ROS 2 peer built with Cyclone DDS's C toolchain (idlc + libddsc), not the Python binding.
 *
 * Publishes sensor_msgs/Image on rt/camera/image_raw (best effort, keep last 1) and std_msgs/String on
 * rt/instruction (ROS 2 default QoS: reliable, volatile, keep last 10), and subscribes to
 * geometry_msgs/Twist on rt/cmd_vel (reliable, keep last 1) and to sensor_msgs/Image on rt/echo/image_raw
 * (best effort, keep last 1), all in XCDR1 as ROS 2's middlewares use. Prints "cmd <linear.x> <angular.z>"
 * per command and "image <width> <height> <encoding> <step> <frame_id> <bytes> <sum of bytes>" per image
 * received, and runs until stdin closes.
 *
 * usage: peer DOMAIN_ID WIDTH HEIGHT   (discovery and interfaces come from CYCLONEDDS_URI)
 * The image is rgb8: red = column % 256, green = row % 256, blue = frame counter % 256.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dds/dds.h"
#include "ros2_types.h"

static int fail(const char *what, dds_return_t rc) {
  fprintf(stderr, "peer: %s failed: %s\n", what, dds_strretcode(rc));
  return 2;
}

static dds_qos_t *make_qos(int reliable, int depth) {
  /* Every policy ROS 2 users rely on is stated, since defaults differ between DDS implementations. */
  dds_qos_t *qos = dds_create_qos();
  dds_data_representation_id_t xcdr1 = DDS_DATA_REPRESENTATION_XCDR1;
  if (reliable)
    dds_qset_reliability(qos, DDS_RELIABILITY_RELIABLE, DDS_MSECS(100));
  else
    dds_qset_reliability(qos, DDS_RELIABILITY_BEST_EFFORT, 0);
  dds_qset_durability(qos, DDS_DURABILITY_VOLATILE);
  dds_qset_history(qos, DDS_HISTORY_KEEP_LAST, depth);
  dds_qset_data_representation(qos, 1, &xcdr1);
  return qos;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s DOMAIN_ID WIDTH HEIGHT\n", argv[0]);
    return 64;
  }
  const dds_domainid_t domain = (dds_domainid_t)atoi(argv[1]);
  const uint32_t width = (uint32_t)atoi(argv[2]), height = (uint32_t)atoi(argv[3]);
  dds_entity_t participant = dds_create_participant(domain, NULL, NULL);
  if (participant < 0) return fail("dds_create_participant", participant);

  dds_qos_t *sensor = make_qos(0, 1), *standard = make_qos(1, 10), *command = make_qos(1, 1);
  dds_entity_t image_topic = dds_create_topic(participant, &sensor_msgs_msg_dds__Image__desc,
                                              "rt/camera/image_raw", NULL, NULL);
  dds_entity_t text_topic = dds_create_topic(participant, &std_msgs_msg_dds__String__desc,
                                             "rt/instruction", NULL, NULL);
  dds_entity_t cmd_topic = dds_create_topic(participant, &geometry_msgs_msg_dds__Twist__desc,
                                            "rt/cmd_vel", NULL, NULL);
  dds_entity_t echo_topic = dds_create_topic(participant, &sensor_msgs_msg_dds__Image__desc,
                                             "rt/echo/image_raw", NULL, NULL);
  if (image_topic < 0 || text_topic < 0 || cmd_topic < 0 || echo_topic < 0)
    return fail("dds_create_topic", -1);
  dds_entity_t image_writer = dds_create_writer(participant, image_topic, sensor, NULL);
  dds_entity_t text_writer = dds_create_writer(participant, text_topic, standard, NULL);
  dds_entity_t cmd_reader = dds_create_reader(participant, cmd_topic, command, NULL);
  dds_entity_t echo_reader = dds_create_reader(participant, echo_topic, sensor, NULL);
  if (image_writer < 0 || text_writer < 0 || cmd_reader < 0 || echo_reader < 0)
    return fail("create writer/reader", -1);

  const uint32_t step = width * 3;
  uint8_t *pixels = malloc((size_t)step * height);
  if (pixels == NULL) return fail("malloc", DDS_RETCODE_OUT_OF_RESOURCES);
  fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
  printf("ready\n");
  fflush(stdout);

  for (uint32_t count = 1;; count++) {
    char byte;
    ssize_t n = read(STDIN_FILENO, &byte, 1);
    if (n == 0) break; /* stdin closed: the test is done */

    for (uint32_t y = 0; y < height; y++)
      for (uint32_t x = 0; x < width; x++) {
        uint8_t *p = pixels + (size_t)y * step + (size_t)x * 3;
        p[0] = (uint8_t)(x % 256); p[1] = (uint8_t)(y % 256); p[2] = (uint8_t)(count % 256);
      }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    sensor_msgs_msg_dds__Image_ image;
    memset(&image, 0, sizeof image);
    image.header.stamp.sec = (int32_t)now.tv_sec;
    image.header.stamp.nanosec = (uint32_t)now.tv_nsec;
    image.header.frame_id = "c_peer_camera";
    image.height = height;
    image.width = width;
    image.encoding = "rgb8";
    image.step = step;
    image.data._buffer = pixels;
    image.data._length = image.data._maximum = step * height;
    image.data._release = false;
    dds_return_t rc = dds_write(image_writer, &image);
    if (rc < 0) return fail("dds_write(Image)", rc);

    std_msgs_msg_dds__String_ text = {.data = "pick up the red cube"};
    rc = dds_write(text_writer, &text);
    if (rc < 0) return fail("dds_write(String)", rc);

    void *samples[8] = {NULL};
    dds_sample_info_t infos[8];
    int taken = dds_take(cmd_reader, samples, infos, 8, 8);
    for (int i = 0; i < taken; i++) {
      if (!infos[i].valid_data) continue;
      const geometry_msgs_msg_dds__Twist_ *twist = samples[i];
      printf("cmd %.17g %.17g\n", twist->linear.x, twist->angular.z);
    }
    if (taken > 0) dds_return_loan(cmd_reader, samples, taken);

    void *images[1] = {NULL};
    dds_sample_info_t image_info[1];
    taken = dds_take(echo_reader, images, image_info, 1, 1);
    if (taken > 0 && image_info[0].valid_data) {
      const sensor_msgs_msg_dds__Image_ *in = images[0];
      uint32_t sum = 0;
      for (uint32_t i = 0; i < in->data._length; i++) sum += in->data._buffer[i];
      printf("image %u %u %s %u %s %u %u\n", in->width, in->height, in->encoding, in->step,
             in->header.frame_id, in->data._length, sum);
    }
    if (taken > 0) dds_return_loan(echo_reader, images, taken);
    fflush(stdout);
    dds_sleepfor(DDS_MSECS(20));
  }
  free(pixels);
  dds_delete_qos(sensor);
  dds_delete_qos(standard);
  dds_delete_qos(command);
  dds_delete(participant);
  return 0;
}
